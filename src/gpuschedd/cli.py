"""gpusched: the command-line client. A thin layer over the SDK; exit codes follow systemctl's
(0 success, 1 failure, 2 usage, 4 no such model)."""

from __future__ import annotations

import argparse
import json
import pwd
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .client import GpuSched, ModelInfo
from .errors import GpuschedError, NoSuchModel

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_SUCH_MODEL = 4


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def list_rows(models: list[ModelInfo]) -> list[list[str]]:
    rows = [["NAME", "STATE", "UNIT", "OWNER", "PID", "VRAM", "SNAPSHOT"]]
    for m in models:
        rows.append(
            [
                m.name,
                m.state,
                m.unit,
                user_name(m.owner),
                str(m.main_pid or "-"),
                human_bytes(m.vram_bytes) if m.vram_bytes else "-",
                human_bytes(m.snapshot_bytes) if m.snapshot_bytes else "-",
            ]
        )
    return rows


def show_status(gs: GpuSched, as_json: bool) -> None:
    manager = gs.status()
    models = [gs.model(m.name) for m in gs.models()]
    if as_json:
        print(json.dumps({"manager": manager, "models": models}, indent=2))
        return
    for m in models:
        state = m["State"]
        mark = {"running": "●", "frozen": "❄", "failed": "x"}.get(state, "○")
        print(f"{mark} {m['Name']} - {state}")
        print(f"      Unit: {m['Unit']}")
        print(f"     Owner: {user_name(m['Owner'])} ({m['Owner']})")
        print(f"   Command: {' '.join(m['Command'])}")
        print(f"      PIDs: {' '.join(map(str, m['Pids'])) or '-'}")
        print(f"      GPUs: {' '.join(m['Gpus']) or '-'}")
        print(f"      VRAM: {human_bytes(m['VramBytes'])}   snapshot: {human_bytes(m['SnapshotBytes'])}")
        if m["LastFreezeUSec"] or m["LastThawUSec"]:
            print(f"  Last freeze: {m['LastFreezeUSec'] / 1e6:.3f}s   last thaw: {m['LastThawUSec'] / 1e6:.3f}s")
        print()
    for gpu in manager.get("Gpus", []):
        print(
            f"GPU {gpu['index']} {gpu['name']} ({gpu['uuid']}): "
            f"{human_bytes(gpu['used'])} used, {human_bytes(gpu['free'])} free of {human_bytes(gpu['total'])}"
        )
    print(
        f"Host RAM: {human_bytes(manager['RamFrozenBytes'])} parked in frozen models, "
        f"budget {human_bytes(manager['RamBudgetBytes'])}"
    )
    print(f"Backends: checkpoint={manager['CheckpointBackend']} units={manager['UnitBackend']}")
    if not models:
        print("No models.")


def build_parser() -> argparse.ArgumentParser:
    # The global options work before or after the command word (`gpusched --json list`, `gpusched list --json`):
    # the subcommands' copies default to SUPPRESS so they never overwrite a value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument(
        "--no-ask-password",
        action="store_true",
        default=argparse.SUPPRESS,
        help="never ask for authentication: fail if it would be needed",
    )
    parser = argparse.ArgumentParser(
        prog="gpusched", description="Run, freeze and thaw GPU models (gpuschedd client)", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run a command as a model (unit gpusched-model@NAME.service)")
    run.add_argument("--name", required=True)
    run.add_argument("--description", default="")
    run.add_argument("--workdir", default="", help="working directory (absolute)")
    run.add_argument("-E", "--setenv", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--gpus", default="", help="comma-separated GPU indices or UUIDs (CUDA_VISIBLE_DEVICES)")
    run.add_argument("--user", default="", help="run as this user (needs the manage privilege)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")

    for verb, text in (
        ("freeze", "checkpoint a model's GPU state into host RAM and freeze its processes"),
        ("thaw", "restore a frozen model"),
        ("stop", "stop a model's unit"),
        ("forget", "stop managing a model, leaving its unit running"),
    ):
        sub.add_parser(verb, parents=[common], help=text).add_argument("name")
    swap = sub.add_parser("swap", parents=[common], help="freeze one model and thaw another: both or neither")
    swap.add_argument("freeze_name")
    swap.add_argument("thaw_name")
    sub.add_parser("status", parents=[common], help="models, GPUs and host RAM in detail")
    sub.add_parser("list", parents=[common], help="one line per model")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    args.no_ask_password = getattr(args, "no_ask_password", False)
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            parser.error("run: give the command after --")
    try:
        with GpuSched(interactive=not args.no_ask_password) as gs:
            return dispatch(gs, args, command if args.command == "run" else [])
    except NoSuchModel as e:
        print(f"gpusched: {e.message}", file=sys.stderr)
        return EXIT_NO_SUCH_MODEL
    except GpuschedError as e:
        print(f"gpusched: {e.message} ({e.dbus_name})", file=sys.stderr)
        return EXIT_FAILURE
    except (ConnectionError, FileNotFoundError) as e:
        print(f"gpusched: cannot reach the system bus: {e}", file=sys.stderr)
        return EXIT_FAILURE


def dispatch(gs: GpuSched, args: argparse.Namespace, command: list[str]) -> int:
    simple: dict[str, Callable[[str], Any]] = {
        "freeze": gs.freeze,
        "thaw": gs.thaw,
        "stop": gs.stop,
        "forget": gs.forget,
    }
    if args.command in simple:
        simple[args.command](args.name)
    elif args.command == "swap":
        gs.swap(args.freeze_name, args.thaw_name)
    elif args.command == "run":
        path = gs.run(
            args.name,
            command,
            description=args.description,
            working_directory=args.workdir,
            environment=args.setenv,
            gpus=[g for g in args.gpus.split(",") if g],
            user=args.user,
        )
        info = gs.model(args.name)
        if args.json:
            print(json.dumps({"name": args.name, "path": path, "unit": info["Unit"], "pids": info["Pids"]}))
        else:
            print(f"Running {args.name} as unit {info['Unit']}")
    elif args.command == "list":
        models = gs.models()
        if args.json:
            print(json.dumps([asdict(m) for m in models], indent=2))
        elif models:
            print_table(list_rows(models))
        else:
            print("No models.")
    elif args.command == "status":
        show_status(gs, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
