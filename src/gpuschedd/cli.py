"""gpusched: the command-line client. A thin layer over the SDK (D-Bus) and journalctl (history, logs).

Exit codes follow systemctl's: 0 success, 1 failure, 2 usage, 3 a model named to `status` is not live (stopped or
failed), 4 no such model. `--json` makes every command's output machine-readable; on a terminal a long freeze or
thaw shows its progress on stderr, and nothing extra is written when output goes to a pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any, TextIO

from . import __version__, eventlog, hostmem
from .client import GpuSched, ModelInfo
from .config import ConfigError, parse_size
from .errors import GpuschedError, NoSuchModel
from .names import model_unit, validate_model_name
from .options import Policies, RunOptions, declared

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_LIVE = 3
EXIT_NO_SUCH_MODEL = 4

# The state's glyph and colour, like systemctl's: ● active, ○ inactive, a cross failed; ❄ frozen, ◐ moving.
GLYPHS = {
    "running": ("●", "32"),
    "freezing": ("◐", "33"),
    "frozen": ("❄", "36"),
    "thawing": ("◐", "33"),
    "stopped": ("○", "0"),
    "failed": ("\N{MULTIPLICATION SIGN}", "31"),
}
PROGRESS_DELAY = 0.2  # seconds before a progress line appears: quick operations stay quiet
PROGRESS_INTERVAL = 0.1


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_ago(seconds: float) -> str:
    """systemd's style: 42s ago, 5min 3s ago, 2h 7min ago, 3 days 4h ago."""
    s = max(int(seconds), 0)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days} day{'s' if days != 1 else ''}"] if days else []
    parts += [f"{hours}h"] if hours else []
    parts += [f"{minutes}min"] if minutes else []
    parts += [f"{s}s"] if s or not parts else []
    return " ".join(parts[:2]) + " ago"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def colors(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def paint(text: str, code: str, on: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if on and code != "0" else text


def print_table(rows: list[list[str]], legend: bool = True) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows if legend else rows[1:]:
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


# ----------------------------------------------------------------------------------------------- status


def status_line(models: list[dict[str, Any]]) -> str:
    """The same summary the daemon puts in STATUS=: "2 running, 1 frozen"."""
    states = [m["State"] for m in models]
    return ", ".join(f"{states.count(s)} {s}" for s in GLYPHS if s in states) or "no models"


def gpu_label(gpu_id: str, gpus: list[dict[str, Any]]) -> str:
    for gpu in gpus:
        if gpu_id in (gpu["uuid"], str(gpu["index"])):
            return f"{gpu['index']} ({gpu['uuid']})"
    return gpu_id


def manager_lines(manager: dict[str, Any], models: list[dict[str, Any]], color: bool) -> list[str]:
    lines = [f"{paint('●', '32', color)} gpuschedd {manager['Version']} - {status_line(models)}"]
    lines.append(f"{'Backends':>12}: checkpoint {manager['CheckpointBackend']}, units {manager['UnitBackend']}")
    gpus = manager.get("Gpus", [])
    for i, gpu in enumerate(gpus):
        lines.append(
            f"{'GPUs' if i == 0 else '':>12}{':' if i == 0 else ' '} {gpu['index']}: {gpu['name']}, "
            f"{human_bytes(gpu['used'])} used, {human_bytes(gpu['free'])} free of {human_bytes(gpu['total'])}"
            f" ({gpu['uuid']})"
        )
    if not gpus:
        lines.append(f"{'GPUs':>12}: none seen (no NVML)")
    lines.append(
        f"{'Host RAM':>12}: {human_bytes(manager['RamFrozenBytes'])} parked in frozen models, "
        f"budget {human_bytes(manager['RamBudgetBytes'])}"
    )
    thp = manager.get("TransparentHugepages", "")
    if thp:
        hint = "" if thp == "always" else " (always makes checkpoints 1.3-1.8x faster)"
        lines.append(f"{'THP':>12}: {thp}{hint}")
    return lines


def model_lines(m: dict[str, Any], gpus: list[dict[str, Any]], color: bool, now: float) -> list[str]:
    glyph, code = GLYPHS.get(m["State"], ("○", "0"))
    lines = [f"{paint(glyph, code, color)} {m['Name']} - {paint(m['State'], code, color)}"]

    def add(label: str, value: str) -> None:
        lines.append(f"{label:>12}: {value}")

    add("Unit", m["Unit"])
    add("Owner", f"{user_name(m['Owner'])} ({m['Owner']})")
    add("Command", " ".join(m["Command"]))
    since = m["StateChangeTimestamp"] / 1e6
    if since:
        stamp = datetime.fromtimestamp(since).astimezone().strftime("%a %Y-%m-%d %H:%M:%S %Z")
        add("Since", f"{stamp}; {human_ago(now - since)}")
    if m["MainPid"]:
        add("Main PID", str(m["MainPid"]))
    add("PIDs", " ".join(map(str, m["Pids"])) or "-")
    add("GPUs", ", ".join(gpu_label(g, gpus) for g in m["Gpus"]) or "-")
    if m["State"] in ("frozen", "freezing", "thawing") or m["SnapshotBytes"]:
        add("Snapshot", f"{human_bytes(m['SnapshotBytes'])} in host RAM")
    else:
        add("VRAM", human_bytes(m["VramBytes"]))
    if m["LastFreezeUSec"] or m["LastThawUSec"]:
        add("Last freeze", f"{m['LastFreezeUSec'] / 1e6:.3f} s, last thaw {m['LastThawUSec'] / 1e6:.3f} s")
    if m.get("Agent"):
        path = m.get("FreezePath") or "not frozen yet"
        parked = (
            f", {human_bytes(m['ParkedBytes'])} parked by its agent"
            if m.get("FreezePath") in ("agent", "agent-only")
            else ""
        )
        kept = ", keeps its CUDA contexts" if m.get("KeepContext") else ""
        add("Fast path", f"agent{kept}; last freeze: {path}{parked}")
    if "Priority" in m:  # a daemon older than the CLI has no policy properties

        def after(seconds: int) -> str:
            return f"after {seconds}s" if seconds else "never"

        add(
            "Policies",
            f"priority {m['Priority']}, idle freeze {after(m['IdleFreezeSec'])}, "
            f"stop when frozen {after(m['FrozenTTLSec'])}",
        )
    return lines


def show_status(gs: GpuSched, names: list[str], as_json: bool) -> int:
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
        print(json.dumps({"manager": manager, "models": models}, indent=2))
        return rc
    color = colors(sys.stdout)
    blocks = [] if names else [manager_lines(manager, models, color)]
    now = time.time()
    blocks += [model_lines(m, manager.get("Gpus", []), color, now) for m in models]
    print("\n\n".join("\n".join(block) for block in blocks))
    return rc


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """While a call runs, a line on the terminal (stderr) saying what is under way and for how long:
    `Freezing llama: 1.2 GiB of 3.6 GiB, 0.8 s`. Nothing at all when stderr is not a terminal.

    A freeze's checkpoint lands in the model's own processes' memory, so the growth of their resident size is
    the part already copied; a thaw shows its size and the time."""

    def __init__(
        self,
        text: str,
        total: int = 0,
        pids: Iterable[int] = (),
        stream: TextIO | None = None,
        rss: Callable[[int], int] = hostmem.rss_bytes,
    ) -> None:
        self.text, self.total, self.pids, self.rss = text, total, list(pids), rss
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self._start = 0.0
        self._base = 0

    def _moved(self) -> int:
        return sum(map(self.rss, self.pids)) - self._base if self.pids else 0

    def line(self, elapsed: float) -> str:
        moved = min(max(self._moved(), 0), self.total) if self.total else 0
        if moved:
            size = f"{human_bytes(moved)} of {human_bytes(self.total)}, "
        elif self.total:
            size = f"{human_bytes(self.total)}, "
        else:
            size = ""
        return f"{self.text}: {size}{elapsed:.1f} s"

    def _run(self) -> None:
        while not self._done.wait(PROGRESS_DELAY if not self._shown else PROGRESS_INTERVAL):
            self.stream.write("\r\x1b[K" + self.line(time.monotonic() - self._start))
            self.stream.flush()
            self._shown = True

    def __enter__(self) -> Progress:
        if self.enabled:
            self._start = time.monotonic()
            self._base = sum(map(self.rss, self.pids))
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def transition(gs: GpuSched, verb: str, name: str, as_json: bool) -> None:
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
        print(json.dumps(gs.model(name), indent=2))
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


def swap(gs: GpuSched, out: str, into: str, as_json: bool) -> None:
    interactive = sys.stderr.isatty()
    before_out = gs.model(out) if interactive else {}
    before_in = gs.model(into) if interactive else {}
    total = before_out.get("VramBytes", 0) + before_in.get("SnapshotBytes", 0)
    started = time.monotonic()
    with Progress(f"Swapping {out} out and {into} in", total):
        gs.swap(out, into)
    if as_json:
        print(json.dumps({"frozen": gs.model(out), "thawed": gs.model(into)}, indent=2))
    elif sys.stdout.isatty():
        print(f"Swapped {out} out and {into} in, in {time.monotonic() - started:.2f} s")


# ----------------------------------------------------------------------------------------------- journal


def event_line(event: eventlog.JournalEvent, width: int, color: bool) -> str:
    stamp = event.time.strftime("%b %d %H:%M:%S.") + f"{event.time.microsecond // 1000:03d}"
    code = {3: "31", 4: "33"}.get(event.priority, "0")
    return f"{stamp} {event.event:<8} {event.model or '-':<{width}} {paint(event.message, code, color)}"


def show_events(args: argparse.Namespace) -> int:
    color = colors(sys.stdout)
    try:
        if args.follow:
            for event in eventlog.follow(args.model, args.since, args.lines):
                print(json.dumps(event.to_json()) if args.json else event_line(event, 20, color), flush=True)
            return 0
        events = eventlog.read(args.model, args.since, args.lines)
    except subprocess.CalledProcessError:
        return EXIT_FAILURE  # journalctl said why on stderr
    except FileNotFoundError:
        print("gpusched: journalctl not found", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        for event in events:
            print(json.dumps(event.to_json()))
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
    except (GpuschedError, OSError):
        pass  # not known (any more) or no daemon: its unit's journal is still there
    argv = ["journalctl", f"--unit={unit}"]
    if args.lines is not None:
        argv.append(f"--lines={args.lines}")
    if args.follow:
        argv.append("--follow")
    if args.no_pager:
        argv.append("--no-pager")
    if args.json:
        argv.append("--output=json")
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
    except ConfigError:
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
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
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
        ("freeze", "checkpoint a model's GPU state into host RAM and freeze its processes"),
        ("thaw", "restore a frozen model"),
        ("stop", "stop a model's unit"),
        ("forget", "stop managing a model, leaving its unit running"),
    ):
        sub.add_parser(verb, parents=[common], help=text).add_argument("name")
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
    logs.add_argument("--no-pager", action="store_true", help="do not pipe the output into a pager")

    sub.add_parser("dashboard", parents=[common], help="a live terminal view: GPUs, host RAM, models, events")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    args.no_ask_password = getattr(args, "no_ask_password", False)
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
        return EXIT_FAILURE
    except (ConnectionError, FileNotFoundError) as e:
        print(f"gpusched: cannot reach the system bus: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def report_new_model(gs: GpuSched, name: str, path: str, verb: str, as_json: bool) -> None:
    info = gs.model(name)
    if as_json:
        print(json.dumps({"name": name, "path": path, "unit": info["Unit"], "pids": info["Pids"]}))
    else:
        print(f"{verb} {name} as unit {info['Unit']}")


def dispatch(gs: GpuSched, args: argparse.Namespace, command: list[str]) -> int:
    simple: dict[str, Callable[[str], Any]] = {"stop": gs.stop, "forget": gs.forget}
    if args.command in simple:
        simple[args.command](args.name)
        if args.json:
            print(json.dumps({"name": args.name, "command": args.command, "ok": True}))
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
            print(json.dumps({"name": args.name, "command": "migrate", "ok": True, "gpus": gpus}))
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
            print(json.dumps([asdict(m) for m in models], indent=2))
        elif models:
            print_table(list_rows(models), legend=not args.no_legend)
        elif not args.no_legend:
            print("No models.")
    elif args.command == "status":
        return show_status(gs, args.names, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
