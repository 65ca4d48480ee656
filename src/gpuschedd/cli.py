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

from . import __version__, eventlog
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
from .options import Policies, RunOptions, declared
from .validate import parse_size

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
    with Progress(f"Paging {name} out to swap", total):
        (gs.freeze_to_disk if freeze else gs.page_out)(name)
    after = gs.model(name)
    if as_json:
        print(to_json(after, as_json))
    elif sys.stdout.isatty():
        print(
            f"{name} is frozen: {human_bytes(after['SnapshotSwapBytes'])} of its snapshot in swap, "
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


def size_arg(text: str) -> int:
    """A size as systemd and gpuschedd.conf write it: 8G, 512M, 1.5T, plain bytes (powers of 1024)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M, 1.5T)") from None


# How the CLI reads an option (options.Option.cli), as argparse arguments.
_CLI_READS: dict[str, dict[str, Any]] = {
    "str": {},
    "int": {"type": int},
    "flag": {"action": "store_true"},
    "list": {"type": lambda text: [item for item in text.split(",") if item]},
    "append": {"action": "append", "metavar": "NAME=VALUE"},
    "size": {"type": size_arg, "metavar": "SIZE"},
}


def add_option_flags(parser: argparse.ArgumentParser, cls: type[Policies], skip: type[Policies] | None = None) -> None:
    """A flag per declared option of `cls` (not those of `skip`), stored under the SDK keyword (the field name),
    None when not given: the SDK then sends nothing and the daemon's default applies."""
    skipped = {f.name for f, _spec in declared(skip)} if skip else set()
    for f, spec in declared(cls):
        if spec.flags and f.name not in skipped:
            reads = dict(_CLI_READS[spec.cli])
            if spec.cli != "flag":
                reads.setdefault("metavar", spec.flags[-1].lstrip("-").upper().replace("-", "_"))  # --workdir WORKDIR
            parser.add_argument(*spec.flags, dest=f.name, default=None, help=spec.help or None, **reads)


def option_args(args: argparse.Namespace, cls: type[Policies]) -> dict[str, Any]:
    """The options given on the command line, as the SDK's keywords."""
    return {f.name: getattr(args, f.name) for f, _spec in declared(cls) if getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    # The global options work before or after the command word (`gpusched --json list`, `gpusched list --json`):
    # the subcommands' copies default to SUPPRESS so they never overwrite a value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_const",
        const="short",
        default=argparse.SUPPRESS,
        help="machine-readable output: --json or --json=short one line, --json=pretty indented",
    )
    # --json=STYLE as options of their own: a --json taking an optional value would swallow the command word of
    # `gpusched --json list`.
    for style in ("short", "pretty"):
        common.add_argument(
            f"--json={style}", dest="json", action="store_const", const=style, default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )  # fmt: skip
    common.add_argument(
        "--no-pager",
        action="store_true",
        default=argparse.SUPPRESS,
        help="do not pipe output into a pager (only `logs` pages, through journalctl; accepted everywhere, as "
        "systemctl does)",
    )
    common.add_argument(
        "--no-ask-password",
        action="store_true",
        default=argparse.SUPPRESS,
        help="never ask for authentication: fail if it would be needed",
    )
    parser = argparse.ArgumentParser(
        prog="gpusched",
        description="Run, freeze and thaw GPU models (gpuschedd client). See gpusched(1).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"gpusched {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The policies of every new model, run or adopted (docs/configuration.md), and Run's other options: their
    # flags come from their declarations (options.py); an option not given is left to the daemon.
    policies = argparse.ArgumentParser(add_help=False)
    add_option_flags(policies, Policies)
    run = sub.add_parser(
        "run", parents=[common, policies], help="run a command as a model (unit gpusched-model@NAME.service)"
    )
    run.add_argument("--name", required=True)
    add_option_flags(run, RunOptions, skip=Policies)
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")

    for verb, text in (
        ("start", "start a model of the catalog (/etc/gpusched/models.d/NAME.conf) as its file defines it"),
        ("freeze", "checkpoint a model's GPU state into host RAM and freeze its processes"),
        ("thaw", "restore a frozen model"),
        ("stop", "stop a model's unit"),
        ("forget", "stop managing a model, leaving its unit running"),
    ):
        sub.add_parser(verb, parents=[common], help=text).add_argument("name")
    sub.choices["freeze"].add_argument(
        "--to-disk", action="store_true", help="then page its snapshot out to swap (as page-out)"
    )
    page_out = sub.add_parser(
        "page-out", parents=[common], help="page a frozen model's snapshot out to swap, freeing host RAM"
    )
    page_out.add_argument("name")
    adopt = sub.add_parser(
        "adopt",
        parents=[common, policies],
        help="manage a running unit in place, or move running processes into a scope",
    )
    adopt.add_argument("name")
    what = adopt.add_mutually_exclusive_group(required=True)
    what.add_argument("--unit", help="an existing service or scope, e.g. vllm.service (it keeps its name)")
    what.add_argument(
        "--pid", type=int, action="append", help="a process to move into gpusched-adopt-NAME.scope (repeatable)"
    )
    swap_parser = sub.add_parser("swap", parents=[common], help="freeze one model and thaw another: both or neither")
    swap_parser.add_argument("freeze_name")
    swap_parser.add_argument("thaw_name")
    migrate = sub.add_parser("migrate", parents=[common], help="move a model onto another GPU (freeze, restore there)")
    migrate.add_argument("name")
    migrate.add_argument("--to", required=True, metavar="GPU", help="the target GPU: an index or a UUID")
    sub.add_parser("reload", parents=[common], help="read the model catalog's files again (needs manage)")
    status = sub.add_parser("status", parents=[common], help="the daemon, GPUs, host RAM and models, in detail")
    status.add_argument("names", nargs="*", metavar="NAME", help="only these models")
    listing = sub.add_parser("list", parents=[common], help="one line per model")
    listing.add_argument("--no-legend", action="store_true", help="no header line")

    events = sub.add_parser("events", parents=[common], help="the event history from the journal")
    events.add_argument("--model", "-m", help="only this model's events")
    events.add_argument("--since", "-S", help='as journalctl reads it: "today", "-1h", "2025-01-31 12:00"')
    events.add_argument("-n", "--lines", type=int, help="only the last N events")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events as they happen")

    logs = sub.add_parser("logs", parents=[common], help="a model's own output (its unit's journal)")
    logs.add_argument("name")
    logs.add_argument("-n", "--lines", type=int, help="only the last N lines")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    sub.add_parser("dashboard", parents=[common], help="a live terminal view: GPUs, host RAM, models, events")
    help_parser = sub.add_parser("help", parents=[common], help="show the help of gpusched or of one command")
    help_parser.add_argument("topic", nargs="?", metavar="COMMAND")

    return parser


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


def show_help(parser: argparse.ArgumentParser, topic: str | None) -> int:
    """`gpusched help [COMMAND]`: the help of gpusched, or of one command (as `gpusched COMMAND --help`)."""
    if topic is None:
        parser.print_help()
        return 0
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if topic not in commands:
        parser.error(f"help: no command {topic!r}; commands: {', '.join(commands)}")
    commands[topic].print_help()
    return 0


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
