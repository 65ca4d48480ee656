"""Helpers of the security tests: the users alice (in gpusched) and bob (not), and raw D-Bus calls made as them.

`calls_as(user, [...])` sends a batch of method calls from one connection of that user (a child process that
drops to the user with setpriv and speaks dbus-fast) and returns, per call, whether it succeeded, the error name,
and the error text. Any signature, any body, with or without the ALLOW_INTERACTIVE_AUTHORIZATION flag: what
busctl and gdbus cannot send (wrong variant types, nested variants, huge strings) goes this way.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sysutil import MANAGER_IFACE, MANAGER_PATH, WORKDIR, Counter, run

GROUP = "gpusched"
ALICE = "alice"  # in gpusched
BOB = "bob"  # not

# The child: reads {calls: [{path, interface, member, signature, body, interactive}], parallel}, prints
# [{ok, error, text, body}] in the same order.
# In a body, ["@v", SIG, VALUE] is a Variant and ["@b", HEX] is bytes (JSON has neither).
_CLIENT = r"""
import asyncio, json, sys
from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

def dec(x):
    if isinstance(x, list) and len(x) == 3 and x[0] == "@v":
        return Variant(x[1], dec(x[2]))
    if isinstance(x, list) and len(x) == 2 and x[0] == "@b":
        return bytes.fromhex(x[1])
    if isinstance(x, list):
        return [dec(i) for i in x]
    if isinstance(x, dict):
        return {k: dec(v) for k, v in x.items()}
    return x

def enc(x):
    if isinstance(x, Variant):
        return enc(x.value)
    if isinstance(x, (bytes, bytearray)):
        return x.hex()
    if isinstance(x, (list, tuple)):
        return [enc(i) for i in x]
    if isinstance(x, dict):
        return {str(k): enc(v) for k, v in x.items()}
    return x

async def one(bus, c):
    flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if c.get("interactive") else MessageFlag.NONE
    try:
        msg = Message(destination=c.get("destination", "org.gpusched1"), path=c["path"],
                      interface=c.get("interface"), member=c["member"], signature=c.get("signature", ""),
                      body=dec(c.get("body", [])), flags=flags)
        reply = await asyncio.wait_for(bus.call(msg), 30)
    except asyncio.TimeoutError:
        return {"ok": False, "error": "client:timeout", "text": "", "body": None}
    except Exception as e:  # the client library refused to send it: not the daemon's answer
        return {"ok": False, "error": "client:" + type(e).__name__, "text": str(e)[:200], "body": None}
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else repr(reply.body)
        return {"ok": False, "error": reply.error_name, "text": text, "body": None}
    return {"ok": True, "error": None, "text": "", "body": enc(reply.body)}

async def main():
    request = json.load(sys.stdin)
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    if request["parallel"]:
        out = await asyncio.gather(*(one(bus, c) for c in request["calls"]))
    else:
        out = []
        for c in request["calls"]:
            out.append(await one(bus, c))
            if not bus.connected:  # the bus dropped us for what we sent: go on with a new connection
                bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    print(json.dumps(out))

asyncio.run(main())
"""


@dataclass
class Reply:
    ok: bool
    error: str | None
    text: str
    body: Any

    def __str__(self) -> str:
        return "ok" if self.ok else f"{self.error}: {self.text}"


def as_user_argv(user: str, *argv: str) -> list[str]:
    """argv run as `user` with that user's groups (root: unchanged)."""
    if user == "root":
        return list(argv)
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]


def run_as(user: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(*as_user_argv(user, *argv), check=check, timeout=timeout)


def calls_as(user: str, calls: list[dict[str, Any]], parallel: bool = False, timeout: float = 120) -> list[Reply]:
    """One connection of `user` sends `calls` in order (parallel: all at once) and returns their replies."""
    proc = subprocess.run(
        as_user_argv(user, sys.executable, "-I", "-c", _CLIENT),
        input=json.dumps({"calls": calls, "parallel": parallel}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"client as {user} failed:\n{proc.stderr}"
    replies = [Reply(**r) for r in json.loads(proc.stdout)]
    assert len(replies) == len(calls)
    return replies


def manager(member: str, signature: str = "", *body: Any, interactive: bool = False) -> dict[str, Any]:
    return {
        "path": MANAGER_PATH,
        "interface": MANAGER_IFACE,
        "member": member,
        "signature": signature,
        "body": list(body),
        "interactive": interactive,
    }


def call_as(user: str, member: str, signature: str = "", *body: Any, interactive: bool = False) -> Reply:
    [reply] = calls_as(user, [manager(member, signature, *body, interactive=interactive)])
    return reply


def variant(signature: str, value: Any) -> list[Any]:
    return ["@v", signature, value]


def ensure_users() -> None:
    """The group from the shipped sysusers.d file (as a package's postinst would apply it), alice in it, bob not."""
    run("systemd-sysusers")
    grp.getgrnam(GROUP)
    for user, groups in ((ALICE, [GROUP]), (BOB, [])):
        try:
            pwd.getpwnam(user)
        except KeyError:
            run("useradd", "--create-home", *(["--groups", ",".join(groups)] if groups else []), user)
    assert ALICE in grp.getgrnam(GROUP).gr_mem and BOB not in grp.getgrnam(GROUP).gr_mem


def user_workdir(user: str) -> Path:
    """A directory the user's models can write their counters to."""
    path = WORKDIR / user
    path.mkdir(parents=True, exist_ok=True)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def user_counter(user: str, name: str) -> Counter:
    return Counter(user_workdir(user) / f"{name}.count")


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def proc_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups of /proc/PID/status (real, effective, saved, filesystem)."""
    out: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out
