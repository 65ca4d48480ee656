"""Read floods against the installed daemon: CONNECTIONS connections, each keeping CALLS read-only calls in flight
(Introspect and GetAll of the manager, ListModels, and GetAll of each --model given), for SECONDS seconds. Prints the
calls answered per second, the failures by error name, and the daemon's PID before and after (a changed or missing
PID is a daemon that the flood killed: issue 15.1).

    python3 bench/read_flood.py [--connections 16] [--calls 32] [--seconds 10] [--model NAME ...] [--json]

Run it as a user outside group gpusched (`setpriv --reuid=bob --regid=bob --init-groups -- python3 ...`): reading
is open to everyone. Needs only dbus-fast; the daemon's PID is read with busctl (GetConnectionUnixProcessID)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import time

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

BUS_NAME = "org.gpusched1"
MANAGER = "/org/gpusched1"


def daemon_pid() -> int:
    out = subprocess.run(
        ["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
         "GetConnectionUnixProcessID", "s", BUS_NAME],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return int(out.stdout.split()[-1]) if out.returncode == 0 else 0


def calls(models: list[str]) -> list[Message]:
    props = "org.freedesktop.DBus.Properties"
    out = [
        Message(destination=BUS_NAME, path=MANAGER, interface="org.freedesktop.DBus.Introspectable",
                member="Introspect"),
        Message(destination=BUS_NAME, path=MANAGER, interface=props, member="GetAll", signature="s",
                body=["org.gpusched1.Manager"]),
        Message(destination=BUS_NAME, path=MANAGER, interface="org.gpusched1.Manager", member="ListModels"),
    ]  # fmt: skip
    for path in models:
        out.append(
            Message(destination=BUS_NAME, path=path, interface=props, member="GetAll", signature="s",
                    body=["org.gpusched1.Model"])
        )  # fmt: skip
    return out


async def connection(
    kinds: list[Message], in_flight: int, deadline: float, tally: collections.Counter[str], examples: dict[str, str]
) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def worker(i: int) -> None:
        n = i
        while time.monotonic() < deadline:
            template = kinds[n % len(kinds)]
            n += 1
            msg = Message(destination=template.destination, path=template.path, interface=template.interface,
                          member=template.member, signature=template.signature, body=template.body)  # fmt: skip
            try:
                reply = await asyncio.wait_for(bus.call(msg), 30)
            except Exception as e:
                tally[f"client:{type(e).__name__}"] += 1
                await asyncio.sleep(0.1)
                continue
            if reply.message_type != MessageType.ERROR:
                tally["ok"] += 1
                continue
            tally[str(reply.error_name)] += 1
            examples.setdefault(str(reply.error_name), f"{template.member}: {(reply.body or [''])[0]}"[:200])

    await asyncio.gather(*(worker(i) for i in range(in_flight)))
    bus.disconnect()


async def flood(
    connections: int, in_flight: int, seconds: float, models: list[str]
) -> tuple[collections.Counter[str], dict[str, str]]:
    tally: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    kinds = calls(models)
    await asyncio.gather(*(connection(kinds, in_flight, deadline, tally, examples) for _ in range(connections)))
    return tally, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--calls", type=int, default=32, help="calls in flight per connection")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--model", action="append", default=[], help="a model object path to GetAll")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    before = daemon_pid()
    started = time.monotonic()
    tally, examples = asyncio.run(flood(args.connections, args.calls, args.seconds, args.model))
    elapsed = time.monotonic() - started
    after = daemon_pid()
    result = {
        "connections": args.connections,
        "in_flight": args.calls,
        "seconds": round(elapsed, 2),
        "ok": tally.pop("ok", 0),
        "failures": dict(tally),
        "examples": examples,
        "pid_before": before,
        "pid_after": after,
    }
    result["ok_per_sec"] = round(result["ok"] / elapsed)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'connections':>11} {'in flight':>9} {'seconds':>7} {'answered':>8} {'per sec':>7}  daemon PID")
    print(
        f"{args.connections:>11} {args.calls:>9} {result['seconds']:>7} {result['ok']:>8} {result['ok_per_sec']:>7}"
        f"  {before} -> {after}{'' if before == after and after else '  (KILLED)'}"
    )
    if tally:
        print("failures:", ", ".join(f"{k} {v}" for k, v in tally.items()))
        for text in examples.values():
            print("  e.g.", text)


if __name__ == "__main__":
    main()
