"""gpusched-frontdoor: one OpenAI-compatible HTTP endpoint for the catalog's models (docs/frontdoor.md).

A process of its own, as an unprivileged system user, started by gpusched-frontdoor.socket; it talks to gpuschedd
over the system bus like any client (the SDK) and never imports the engine: the daemon stays without network."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from aiohttp import web

from .. import __version__
from .daemonlink import DaemonLink
from .metrics import RouterMetrics
from .router import Router, RouterError
from .server import FrontDoor
from .settings import DEFAULT_PATH, ConfigError, Settings

log = logging.getLogger("gpusched-frontdoor")

SD_LISTEN_FDS_START = 3


def listen_fds() -> list[int]:
    """sd_listen_fds(3): the sockets systemd passed to this process (LISTEN_PID is ours), from fd 3 on. The variables
    are removed, so nothing this process starts takes them for its own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


async def sites(runner: web.AppRunner, settings: Settings) -> list[web.BaseSite]:
    """The socket unit's sockets; without socket activation, Listen= (HOST:PORT)."""
    fds = listen_fds()
    if fds:
        found: list[web.BaseSite] = [web.SockSite(runner, socket.socket(fileno=fd)) for fd in fds]
    else:
        host, _, port = settings.listen.rpartition(":")
        found = [web.TCPSite(runner, host.strip("[]") or None, int(port))]
    for site in found:
        await site.start()
    return found


async def freeze_idle_forever(router: Router, idle_sec: int) -> None:
    """IdleFreezeSec=: look every quarter of it (1 s to 30 s) for models idle that long; 0: never."""
    if idle_sec == 0:
        return
    period = max(1.0, min(idle_sec / 4, 30.0))
    while True:
        await asyncio.sleep(period)
        try:
            frozen = await router.freeze_idle()
        except RouterError as e:
            log.warning("idle models not frozen: %s", e)
        else:
            for name in frozen:
                log.info("froze %s: no request for %d s", name, idle_sec)


async def serve(settings: Settings) -> None:
    metrics = RouterMetrics()
    link = DaemonLink()
    router = Router(link, settings, metrics)
    # No access log: one journal line per request is too much for a busy endpoint; /metrics counts the answers.
    runner = web.AppRunner(FrontDoor(router, settings, metrics).app(), access_log=None)
    await runner.setup()
    await sites(runner, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    idle = asyncio.create_task(freeze_idle_forever(router, settings.idle_freeze_sec))
    log.info("gpusched-frontdoor %s serving", __version__)
    await stop.wait()
    # Waiting requests are answered 503 now; those being served finish (aiohttp waits for them, up to a minute)
    # while systemd keeps the listening socket and queues new connections for the next start.
    router.close()
    idle.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await idle
    await runner.cleanup()
    link.close()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpusched-frontdoor", description="OpenAI-compatible front door of gpuschedd")
    parser.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
    parser.add_argument("--version", action="version", version=f"gpusched-frontdoor {__version__}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        settings = Settings.load(args.config)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    asyncio.run(serve(settings))
    return 0
