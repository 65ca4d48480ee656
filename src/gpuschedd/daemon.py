"""gpuschedd: the daemon's entry point. Wires backends to the engine and the engine to the bus."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import NoReturn

from dbus_fast import RequestNameReply
from dbus_fast.constants import NameFlag

from . import __version__
from .bus.connection import connect_system_bus
from .bus.manager import ManagerInterface
from .bus.polkit import Authority
from .bus.publisher import BusPublisher
from .checkpoint.choose import BackendUnavailable, choose_checkpoint
from .config import DEFAULT_PATH, Config, ConfigError
from .engine import Engine
from .events import EngineListener
from .journal import JournalWriter, journal_queue, setup_logging
from .metrics import Metrics
from .model import Model, State
from .names import BUS_NAME, MANAGER_PATH
from .nvml import load_telemetry
from .statefile import StateFile
from .telemetry import GpuTelemetry
from .testing import FAKE_GPU_ENV
from .units.systemd import SystemdUnits

log = logging.getLogger("gpuschedd")

# How often running models' PIDs and VRAM are re-read.
REFRESH_SEC = 2.0
# How often the policies (idle auto-freeze, frozen time to live) are applied.
POLICY_SEC = 1.0
# How long a stop waits for freezes and thaws under way (systemd's TimeoutStopSec= defaults to 90 s).
DRAIN_TIMEOUT_SEC = 60
# after the drain: how long the replies to the calls it let finish may take to leave (a client that reads slowly)
FLUSH_TIMEOUT_SEC = 2
# How long an exit waits for journal entries still queued (journald may be stopped: never forever).
JOURNAL_FLUSH_SEC = 2.0


def pid1_is_systemd() -> bool:
    """sd_booted(): systemd creates this directory early at boot."""
    return os.path.isdir("/run/systemd/system")


# STATUS= follows the model table within this delay. Each STATUS= wakes PID 1 (which then announces StatusText on the
# bus): sent on every change, a freeze paid for two of them before its reply (bench/control_plane.py), for a
# `freezing` that lasts milliseconds. A burst of changes now becomes one STATUS= with the text as it then is.
STATUS_DELAY_SEC = 0.1


class Notifier(EngineListener):
    """Keeps `systemctl status gpuschedd` telling the truth: READY=1 once serving, STATUS= after every change (at
    most STATUS_DELAY_SEC later, and only when the text differs from the last one sent; at once when the model
    table stops or starts being saved)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pending: asyncio.TimerHandle | None = None
        self._sent = ""
        try:
            from systemd import daemon
        except ImportError:
            self._notify = None
        else:
            self._notify = daemon.notify

    def send(self, text: str) -> None:
        if self._notify is not None:
            self._notify(text)

    def status(self) -> str:
        states = [model.state for model in self.engine.models.values()]
        parts = [f"{states.count(state)} {state}" for state in State if state in states] or ["no models"]
        parked = self.engine.ram_frozen_bytes()
        if parked:
            parts.append(f"{parked / 2**30:.1f} GiB parked in RAM")
        state_file = self.engine.state_file
        if state_file is not None and state_file.error:
            return f"DEGRADED: {state_file.error}; " + ", ".join(parts)
        return ", ".join(parts)

    def ready(self) -> None:
        self._sent = self.status()
        self.send("READY=1\nSTATUS=" + self._sent)

    def _flush(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        text = self.status()
        if text != self._sent:
            self._sent = text
            self.send("STATUS=" + text)

    def model_added(self, model: Model) -> None:
        state_file = self.engine.state_file
        degraded = state_file is not None and state_file.error is not None
        if degraded != self._sent.startswith("DEGRADED"):
            self._flush()  # the model table cannot be saved (or can again): said at once
        elif self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(STATUS_DELAY_SEC, self._flush)

    model_changed = model_removed = model_added


async def start_metrics(engine: Engine, config: Config) -> None:
    """Prometheus metrics when configured. A bad endpoint is logged, not fatal: supervising models comes first."""
    if not (config.metrics_listen or config.metrics_textfile):
        return
    metrics = Metrics(engine, config.metrics_textfile)
    engine.add_listener(metrics)
    if config.metrics_listen:
        try:
            await metrics.serve(config.metrics_listen)
        except OSError as e:
            log.error("metrics: cannot listen on %s: %s", config.metrics_listen, e)


async def keep_fresh(engine: Engine, interval: float = REFRESH_SEC) -> None:
    """Engine.refresh_live every `interval` seconds: the engine announces what changed to its listeners."""
    while True:
        await asyncio.sleep(interval)
        await engine.refresh_live()


async def apply_policies(engine: Engine, stop: asyncio.Event, interval: float = POLICY_SEC) -> None:
    """The automatic decisions (Engine.apply_policies), every `interval` seconds, until `stop` is set (a round under
    way is finished, not cut in half: the daemon's drain waits for it)."""
    while not stop.is_set():
        await asyncio.sleep(interval)
        if stop.is_set():
            return
        try:
            await engine.apply_policies()
        except Exception:
            log.exception("applying the policies")


def choose_telemetry() -> GpuTelemetry:
    """NVML; the fake GPU instead when the sandboxed system tests name its directory (never in production)."""
    fake = os.environ.get(FAKE_GPU_ENV)
    if not fake:
        return load_telemetry()
    from .testing.fakegpu import FakeGpuTelemetry

    log.warning("using the FAKE GPU telemetry in %s (%s is set: tests only)", fake, FAKE_GPU_ENV)
    return FakeGpuTelemetry(fake)


class BusLost(Exception):
    """The system bus went away under a running daemon (dbus restarted, or the connection was cut)."""


async def serve(config: Config) -> int:
    """Serve until SIGTERM (0) or until the bus is lost (BusLost). Nothing on the host is touched before the bus
    name is owned: a second daemon started by hand exits (1) without running recovery or writing the state file."""
    try:
        bus = await connect_system_bus()
    except OSError as e:  # dbus restarting: the unit's Restart= tries again
        raise BusLost(f"cannot connect to the system bus: {e}") from e
    if config.unit_backend == "cgroupfs" or (config.unit_backend == "auto" and not pid1_is_systemd()):
        from .units.cgroupfs import CgroupfsUnits

        units = CgroupfsUnits(config.cgroup_root)
    else:
        units = SystemdUnits(bus)
    engine = Engine(
        units,
        choose_checkpoint(config.checkpoint_backend, config.cuda_checkpoint),
        choose_telemetry(),
        config,
        StateFile(),
    )
    authority = Authority(bus)
    manager = ManagerInterface(engine, authority)
    # Exported before the name is requested, so no call finds the object missing; calls are held by the bus until
    # the engine has taken over the models (bus.ready()).
    bus.export(MANAGER_PATH, manager)
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply != RequestNameReply.PRIMARY_OWNER:
        log.error("could not own %s (%s): is another gpuschedd running? Nothing was touched", BUS_NAME, reply.name)
        return 1
    notifier = Notifier(engine)
    publisher = BusPublisher(bus, engine, authority, manager)
    for listener in (publisher, JournalWriter(), notifier):
        engine.add_listener(listener)
    await start_metrics(engine, config)
    await units.setup()
    await engine.start()
    await engine.reload_catalog()
    bus.ready()
    engine._spawn(engine.preload_catalog)  # Preload=yes, while calls are served (a stop's drain waits for it)
    refresher = asyncio.ensure_future(keep_fresh(engine))
    stop = asyncio.Event()
    policies = asyncio.ensure_future(apply_policies(engine, stop))
    log.info(
        "gpuschedd %s serving %s: units=%s checkpoint=%s, %d model(s) found",
        __version__,
        BUS_NAME,
        units.name,
        engine.checkpoint.name,
        len(engine.models),
    )
    notifier.ready()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP (`systemctl kill -s HUP gpuschedd`; ExecReload= calls Reload, which waits for it) reads the catalog again
    loop.add_signal_handler(signal.SIGHUP, engine._spawn, engine.reload_catalog)
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([disconnected, stopping], return_when=asyncio.FIRST_COMPLETED)
    # Models are separate units: leaving here stops nothing and thaws nothing. A freeze or thaw under way is let
    # finish (it is never cut in half by a stop), with no new calls taken; one cut by a harder kill or by the bus
    # going away is settled by the next start (docs/reliability.md).
    notifier.send("STOPPING=1")
    refresher.cancel()
    policies.cancel()
    if disconnected.done():
        error = disconnected.exception()
        exit_lost_bus(f"the system bus connection was lost ({type(error).__name__ if error else 'closed by the bus'})")
    with contextlib.suppress(Exception):
        await bus.release_name(BUS_NAME)
    if not await engine.drain(DRAIN_TIMEOUT_SEC):
        log.warning("a transition was still under way after %ds; the next start will settle it", DRAIN_TIMEOUT_SEC)
    if not await bus.flush(FLUSH_TIMEOUT_SEC):
        log.warning("a reply was still unsent after %ds", FLUSH_TIMEOUT_SEC)
    bus.disconnect()
    return 0


def exit_lost_bus(why: str) -> NoReturn:
    """Exit 1 at once, so Restart=on-failure brings the daemon back within a second. Without the bus no call can be
    answered and no transition finished (systemd is reached over it): a freeze or thaw under way is left to the next
    start, which settles it (docs/reliability.md), rather than waited for in a thread that may sit in the driver."""
    log.error("%s: exiting to be restarted; the next start settles anything under way", why)
    journal_queue().close(JOURNAL_FLUSH_SEC)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuschedd", description="GPU model supervisor daemon (system bus)")
    parser.add_argument("--config", default=DEFAULT_PATH, help=f"configuration file (default {DEFAULT_PATH})")
    parser.add_argument("--version", action="version", version=f"gpuschedd {__version__}")
    args = parser.parse_args(argv)
    journal = setup_logging()
    try:
        return asyncio.run(serve(Config.load(args.config)))
    except (ConfigError, BackendUnavailable) as e:
        log.error("%s", e)
        return 1
    except BusLost as e:
        exit_lost_bus(str(e))
    finally:
        journal.close(JOURNAL_FLUSH_SEC)


if __name__ == "__main__":
    sys.exit(main())
