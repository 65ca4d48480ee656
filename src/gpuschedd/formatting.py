"""How the clients show things: sizes, ages, users, a state's glyph and colour, the `status` blocks, the `list`
table, an event line and the progress line of a long freeze. Shared by the CLI and the dashboard (which must not
import the CLI: that was a cycle) and free of D-Bus: it formats what the SDK already returned."""

from __future__ import annotations

import json
import os
import pwd
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from . import hostmem

if TYPE_CHECKING:
    from .client import ModelInfo
    from .eventlog import JournalEvent

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


# SYSTEMD_COLORS as systemd reads it: a boolean, or a colour mode (on); anything else leaves the usual rules.
_COLORS_ON = {"1", "yes", "y", "true", "t", "on", "16", "256", "24bit"}
_COLORS_OFF = {"0", "no", "n", "false", "f", "off"}


def colors(stream: TextIO) -> bool:
    """Colour on `stream`: as systemd's tools decide, SYSTEMD_COLORS first, then NO_COLOR, TERM=dumb, a terminal."""
    forced = os.environ.get("SYSTEMD_COLORS", "").strip().lower()
    if forced in _COLORS_ON | _COLORS_OFF:
        return forced in _COLORS_ON
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def to_json(value: object, style: str | bool) -> str:
    """--json=short (plain --json: one line) or --json=pretty (indented), as systemd's tools spell them."""
    return json.dumps(value, indent=2 if style == "pretty" else None)


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
    if "SwapTotalBytes" in manager:
        total, free = manager["SwapTotalBytes"], manager["SwapFreeBytes"]
        swap = f"{human_bytes(total - free)} used, {human_bytes(free)} free of {human_bytes(total)}"
        swap = swap if total else "none (frozen models stay in RAM)"
        lines.append(f"{'Swap':>12}: {swap}" + (", zswap on" if manager.get("Zswap") else ""))
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
        in_swap, in_files = m.get("SnapshotSwapBytes", 0), m.get("SnapshotFileBytes", 0)
        where = f"{human_bytes(m['SnapshotRamBytes'] if in_swap or in_files else m['SnapshotBytes'])} in host RAM"
        where += f", {human_bytes(in_swap)} paged out to swap" if in_swap else ""
        where += f", {human_bytes(in_files)} in spill files" if in_files else ""
        add("Snapshot", where)
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
        injected = " (injected)" if m.get("InjectAgent") else ""
        add("Fast path", f"agent{injected}{kept}; last freeze: {path}{parked}")
    if m.get("Catalog"):
        aliases = f", also {' '.join(m['Aliases'])}" if m.get("Aliases") else ""
        port = f", serves on 127.0.0.1:{m['BackendPort']}" if m.get("BackendPort") else ""
        add("Catalog", f"yes (gpusched start {m['Name']}){aliases}{port}")
    if "Priority" in m:  # a daemon older than the CLI has no policy properties

        def after(seconds: int) -> str:
            return f"after {seconds}s" if seconds else "never"

        add(
            "Policies",
            f"priority {m['Priority']}, idle freeze {after(m['IdleFreezeSec'])}, "
            f"stop when frozen {after(m['FrozenTTLSec'])}",
        )
    return lines


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


# ----------------------------------------------------------------------------------------------- journal


def event_line(event: JournalEvent, width: int, color: bool) -> str:
    stamp = event.time.strftime("%b %d %H:%M:%S.") + f"{event.time.microsecond // 1000:03d}"
    code = {3: "31", 4: "33"}.get(event.priority, "0")
    return f"{stamp} {event.event:<8} {event.model or '-':<{width}} {paint(event.message, code, color)}"
