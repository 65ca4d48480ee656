"""gpusched: the command-line client. A thin layer over the SDK (D-Bus) and journalctl (history, logs).

Exit codes follow systemctl's: 0 success, 1 failure, 2 usage, 3 a model named to `status` is not live (stopped or
failed), 4 no such model. `--json` makes every command's output machine-readable; on a terminal a long freeze or
thaw shows its progress on stderr, and nothing extra is written when output goes to a pipe.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from . import eventlog
from .cli_args import build_parser, copied_environment, option_args, show_help
from .client import GpuSched
from .errors import AccessDenied, GpuschedError, InteractiveAuthorizationRequired, NoSuchModel
from .formatting import (
    Progress,
    colors,
    event_line,
    human_bytes,
    list_rows,
    manager_lines,
    model_lines,
    print_table,
    to_json,
)
from .names import model_unit, validate_model_name
from .options import Policies, RunOptions

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_LIVE = 3
EXIT_NO_SUCH_MODEL = 4
GROUP = "gpusched"  # sysusers.d/gpusched.conf


def show_status(gs: GpuSched, names: list[str], as_json: str | None) -> int:
    manager = gs.status()
    rc = 0
    if names:
        models = []
        for name in names:
            try:
                models.append(gs.model(name))
            except NoSuchModel as e:
                print(f"gpusched: {e.message}", file=sys.stderr)
                rc = EXIT_NO_SUCH_MODEL
        if rc == 0 and any(m["State"] in ("stopped", "failed") for m in models):
            rc = EXIT_NOT_LIVE
    else:
        models = [gs.model(m.name) for m in gs.models()]
    if as_json:
        print(to_json({"manager": manager, "models": models}, as_json))
        return rc
    color = colors(sys.stdout)
    blocks = [] if names else [manager_lines(manager, models, color)]
    now = time.time()
    blocks += [model_lines(m, manager.get("Gpus", []), color, now) for m in models]
    print("\n\n".join("\n".join(block) for block in blocks))
    return rc


def transition(gs: GpuSched, verb: str, name: str, as_json: str | None) -> None:
    """freeze or thaw `name`, with progress on a terminal, then a summary line there (or JSON)."""
    interactive = sys.stderr.isatty() or (sys.stdout.isatty() and not as_json)
    before = gs.model(name) if interactive else {}
    if verb == "freeze":
        progress = Progress(f"Freezing {name}", before.get("VramBytes", 0), before.get("Pids", []))
    else:
        progress = Progress(f"Thawing {name}", before.get("SnapshotBytes", 0))
    with progress:
        getattr(gs, verb)(name)
    if as_json:
        print(to_json(gs.model(name), as_json))
    elif sys.stdout.isatty():
        after = gs.model(name)
        if before.get("State") == after["State"]:
            print(f"{name} was already {after['State']}")
        elif verb == "freeze":
            print(
                f"Froze {name} in {after['LastFreezeUSec'] / 1e6:.2f} s: "
                f"{human_bytes(after['SnapshotBytes'])} parked in host RAM"
            )
        else:
            print(f"Thawed {name} in {after['LastThawUSec'] / 1e6:.2f} s: it runs again")


def to_disk(gs: GpuSched, name: str, freeze: bool, as_json: str | None) -> None:
    """page-out, or freeze --to-disk: then where the snapshot is (docs/disk-tier.md)."""
    before = gs.model(name) if sys.stderr.isatty() else {}
    total = before.get("VramBytes", 0) if before.get("State") == "running" else before.get("SnapshotRamBytes", 0)
    with Progress(f"Paging {name} out to disk", total):
        (gs.freeze_to_disk if freeze else gs.page_out)(name)
    after = gs.model(name)
    if as_json:
        print(to_json(after, as_json))
    elif sys.stdout.isatty():
        print(
            f"{name} is frozen: {human_bytes(after['SnapshotSwapBytes'])} of its snapshot in swap, "
            f"{human_bytes(after.get('SnapshotFileBytes', 0))} in spill files, "
            f"{human_bytes(after['SnapshotRamBytes'])} in host RAM"
        )


def swap(gs: GpuSched, out: str, into: str, as_json: str | None) -> None:
    interactive = sys.stderr.isatty()
    before_out = gs.model(out) if interactive else {}
    before_in = gs.model(into) if interactive else {}
    total = before_out.get("VramBytes", 0) + before_in.get("SnapshotBytes", 0)
    started = time.monotonic()
    with Progress(f"Swapping {out} out and {into} in", total):
        gs.swap(out, into)
    if as_json:
        print(to_json({"frozen": gs.model(out), "thawed": gs.model(into)}, as_json))
    elif sys.stdout.isatty():
        print(f"Swapped {out} out and {into} in, in {time.monotonic() - started:.2f} s")


# ----------------------------------------------------------------------------------------------- journal


def show_events(args: argparse.Namespace) -> int:
    color = colors(sys.stdout)
    try:
        if args.follow:
            for event in eventlog.follow(args.model, args.since, args.lines):
                print(to_json(event.to_json(), args.json) if args.json else event_line(event, 20, color), flush=True)
            return 0
        events = eventlog.read(args.model, args.since, args.lines)
    except subprocess.CalledProcessError:
        return EXIT_FAILURE  # journalctl said why on stderr
    except FileNotFoundError:
        print("gpusched: journalctl not found", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        for event in events:
            print(to_json(event.to_json(), args.json))
        return 0
    width = max((len(e.model) for e in events), default=1)
    for event in events:
        print(event_line(event, width, color))
    if not events:
        print("No events.", file=sys.stderr)
    return 0


def show_logs(args: argparse.Namespace) -> int:
    """Exec journalctl on the model's unit: its own output (plus gpuschedd's entries about it), with journalctl's
    pager, colours and follow mode."""
    validate_model_name(args.name)
    unit = model_unit(args.name)
    try:
        with GpuSched(interactive=False) as gs:
            unit = gs.model(args.name)["Unit"]
    except GpuschedError:
        pass  # not known (any more) or no daemon: its unit's journal is still there
    argv = ["journalctl", f"--unit={unit}"]
    if args.lines is not None:
        argv.append(f"--lines={args.lines}")
    if args.follow:
        argv.append("--follow")
    if args.no_pager:
        argv.append("--no-pager")
    if args.json:
        argv.append("--output=json-pretty" if args.json == "pretty" else "--output=json")
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"gpusched: cannot run journalctl: {e}", file=sys.stderr)
    return EXIT_FAILURE


# ----------------------------------------------------------------------------------------------- parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", None)
    args.no_ask_password = getattr(args, "no_ask_password", False)
    args.no_pager = getattr(args, "no_pager", False)
    if args.command == "help":
        return show_help(parser, args.topic)
    command: list[str] = []
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("run: give the command after --")
    try:
        if args.command == "events":
            return show_events(args)
        if args.command == "logs":
            return show_logs(args)
        if args.command == "dashboard":
            if args.json or not sys.stdout.isatty():
                parser.error("dashboard: needs a terminal (for a script: gpusched status --json, events -f --json)")
            from .dashboard import run_dashboard

            return run_dashboard(interactive=not args.no_ask_password)
        with GpuSched(interactive=not args.no_ask_password) as gs:
            return dispatch(gs, args, command)
    except NoSuchModel as e:
        print(f"gpusched: {e.message}", file=sys.stderr)
        return EXIT_NO_SUCH_MODEL
    except GpuschedError as e:
        print(f"gpusched: {e.message} ({e.dbus_name})", file=sys.stderr)
        if isinstance(e, AccessDenied | InteractiveAuthorizationRequired):
            hint = access_hint()
            if hint:
                print(f"gpusched: {hint}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def access_hint() -> str:
    """What a user refused for not being in group gpusched can do about it (polkit lets its members run and control
    their own models: polkit/50-gpusched.rules); empty where that is not the reason."""
    try:
        group = grp.getgrnam(GROUP)
    except KeyError:
        return ""
    if os.geteuid() == 0 or group.gr_gid in os.getgroups():
        return ""
    user = pwd.getpwuid(os.getuid()).pw_name
    if user in group.gr_mem:
        return f"{user} is in group {GROUP}, but this login session is not yet: log in again (or run newgrp {GROUP})"
    return (
        f"members of group {GROUP} may run models and control their own; to join, as root: "
        f"usermod -aG {GROUP} {user}, then log in again"
    )


def report_new_model(gs: GpuSched, name: str, path: str, verb: str, as_json: str | None) -> None:
    info = gs.model(name)
    if as_json:
        print(to_json({"name": name, "path": path, "unit": info["Unit"], "pids": info["Pids"]}, as_json))
    else:
        print(f"{verb} {name} as unit {info['Unit']}")


def dispatch(gs: GpuSched, args: argparse.Namespace, command: list[str]) -> int:
    simple: dict[str, Callable[[str], Any]] = {"stop": gs.stop, "forget": gs.forget}
    if args.command in simple:
        simple[args.command](args.name)
        if args.json:
            print(to_json({"name": args.name, "command": args.command, "ok": True}, args.json))
    elif args.command == "start":
        report_new_model(gs, args.name, gs.start(args.name), "Started", args.json)
    elif args.command == "reload":
        gs.reload()
        if args.json:
            print(to_json({"command": "reload", "ok": True}, args.json))
    elif args.command == "page-out" or getattr(args, "to_disk", False):
        to_disk(gs, args.name, args.command == "freeze", args.json)
    elif args.command in ("freeze", "thaw"):
        transition(gs, args.command, args.name, args.json)
    elif args.command == "swap":
        swap(gs, args.freeze_name, args.thaw_name, args.json)
    elif args.command == "adopt":
        given = option_args(args, Policies)
        path = (
            gs.adopt(args.name, args.unit, **given) if args.unit else gs.adopt_processes(args.name, args.pid, **given)
        )
        report_new_model(gs, args.name, path, "Adopted", args.json)
    elif args.command == "migrate":
        gs.migrate(args.name, args.to)
        gpus = gs.model(args.name)["Gpus"]
        if args.json:
            print(to_json({"name": args.name, "command": "migrate", "ok": True, "gpus": gpus}, args.json))
        else:
            print(f"{args.name} now runs on {' '.join(gpus)}")
    elif args.command == "run":
        given = option_args(args, RunOptions)
        # The default working directory is the caller's, so relative paths in the command work.
        given["working_directory"] = os.path.abspath(given.get("working_directory") or os.getcwd())
        if "environment" in given:
            given["environment"] = copied_environment(given["environment"])
        path = gs.run(args.name, command, **given)
        report_new_model(gs, args.name, path, "Running", args.json)
    elif args.command == "list":
        models = gs.models()
        if args.json:
            print(to_json([asdict(m) for m in models], args.json))
        elif models:
            print_table(list_rows(models), legend=not args.no_legend)
        elif not args.no_legend:
            print("No models.")
    elif args.command == "status":
        return show_status(gs, args.names, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
