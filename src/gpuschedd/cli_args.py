"""gpusched's command line: the argument parser, with the Run options' flags made from their declarations
(options.py), and `gpusched help`. cli.py dispatches what it parses."""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import __version__
from .options import Policies, RunOptions, declared
from .validate import parse_size


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
    "append": {"action": "append", "metavar": "NAME[=VALUE]"},
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


def copied_environment(entries: list[str]) -> list[str]:
    """systemd-run's -E NAME: an entry without "=" takes the caller's value, the empty string where it has none (as
    systemd-run does: -E NAME is -E NAME=$NAME in a shell). A model's unit gets none of the caller's variables else."""
    return [entry if "=" in entry else f"{entry}={os.environ.get(entry, '')}" for entry in entries]


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
