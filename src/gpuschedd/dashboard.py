"""`gpusched dashboard`: a live terminal view of gpuschedd (curses, standard library).

GPU and host-RAM bars, the model table and the event log, kept current by the daemon's signals (a change shows at
once), a poll every second (GPU memory moves without signals) and the journal (`journalctl -f` on our entries).
Keys act on the selected model: f freeze, t thaw, s swap (then pick the model to thaw, Enter), x stop (y to
confirm), r refresh, q quit; arrows or j/k select. Calls run in the background, so the view stays live while a
freeze of several GB takes its seconds.

`render()` turns a snapshot of the state into styled lines and knows nothing of curses, so it is tested as text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import curses
import locale
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import eventlog
from .client import AsyncGpuSched, EventStream
from .errors import GpuschedError
from .formatting import GLYPHS, human_bytes, status_line, user_name

REFRESH_SEC = 1.0
FRAME_SEC = 0.05
EVENT_BACKLOG = 200
_LABEL_W = 22  # the meters' label column
KEYS_HELP = "↑↓ select  f freeze  t thaw  s swap  x stop  r refresh  q quit"

# Styles of render()'s lines and cells; the curses layer maps them to colour pairs.
PLAIN, BOLD, GOOD, WARN, BAD, COLD, DIM, SELECTED = ("plain", "bold", "good", "warn", "bad", "cold", "dim", "selected")
STATE_STYLE = {"running": GOOD, "frozen": COLD, "freezing": WARN, "thawing": WARN, "stopped": DIM, "failed": BAD}
PRIORITY_STYLE = {3: BAD, 4: WARN}

Segment = tuple[str, str]  # (text, style)
Line = list[Segment]


@dataclass
class View:
    """Everything the screen shows: what the daemon said last, and what the person is doing."""

    manager: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    events: collections.deque[eventlog.JournalEvent] = field(
        default_factory=lambda: collections.deque(maxlen=EVENT_BACKLOG)
    )
    selected: str = ""
    swap_out: str = ""  # set while picking the model a swap thaws
    confirm_stop: str = ""  # set while asking whether to stop this model
    busy: str = ""  # the call under way, e.g. "Freezing llama"
    busy_since: float = 0.0
    message: tuple[str, str] = ("", PLAIN)
    error: str = ""  # the daemon cannot be reached

    def names(self) -> list[str]:
        return [m["Name"] for m in self.models]

    def select(self, step: int) -> None:
        names = self.names()
        if not names:
            self.selected = ""
            return
        i = names.index(self.selected) if self.selected in names else 0
        self.selected = names[max(0, min(len(names) - 1, i + step))]


def bar(used: int, total: int, width: int, utf8: bool) -> str:
    full, empty = ("█", "░") if utf8 else ("#", ".")
    if width <= 0:
        return ""
    filled = round(width * used / total) if total > 0 else 0
    filled = max(0, min(width, filled))
    return full * filled + empty * (width - filled)


def _cell(text: str, width: int) -> str:
    return text[:width].ljust(width)


def render(view: View, width: int, height: int, utf8: bool = True, now: float | None = None) -> list[Line]:
    """The screen as lines of styled segments, top to bottom, at most `height` lines of at most `width` columns:
    the title and meters, the model table, then the event log in what room is left above the status and keys."""
    now = time.monotonic() if now is None else now
    lines = [*_header(view, width, utf8), [], *_model_table(view, width, utf8), []]
    room = height - len(lines) - 3
    if room > 0:
        lines += _event_log(view, room)
    lines = lines[: max(height - 2, 0)]
    lines += [[]] * (height - 2 - len(lines))
    lines.append([_status(view, now)])
    lines.append([(KEYS_HELP if utf8 else KEYS_HELP.replace("↑↓", "up/down"), DIM)])
    return [_clip(line, width) for line in lines[:height]]


def _header(view: View, width: int, utf8: bool) -> list[Line]:
    """The title (version, states, backends) and a bar per GPU and for the host RAM frozen models hold."""
    m = view.manager
    title = f"gpuschedd {m.get('Version', '?')} - {status_line(view.models)}"
    if m:
        title += f" - checkpoint {m.get('CheckpointBackend')}, units {m.get('UnitBackend')}"
        if m.get("TransparentHugepages"):
            title += f", THP {m['TransparentHugepages']}"
    lines: list[Line] = [[(title, BOLD)]]
    if view.error:
        lines.append([(view.error, BAD)])
    bar_w = max(width - _LABEL_W - 30 - 4, 10)
    gpus = m.get("Gpus", [])
    for gpu in gpus:
        used, total = gpu["used"], gpu["total"]
        style = BAD if total and used / total > 0.9 else GOOD
        label = f"GPU {gpu['index']} {gpu['name']}"
        lines.append(
            _meter(label, used, total, bar_w, utf8, style, f"{human_bytes(used)} used of {human_bytes(total)}")
        )
    if m and not gpus:
        lines.append([("GPUs: none seen (no NVML)", DIM)])
    if m:
        parked, budget = m.get("RamFrozenBytes", 0), m.get("RamBudgetBytes", 0)
        style = WARN if budget and parked / budget > 0.8 else COLD
        numbers = f"{human_bytes(parked)} of {human_bytes(budget)} budget"
        lines.append(_meter("Host RAM (parked)", parked, budget, bar_w, utf8, style, numbers))
    return lines


def _meter(label: str, used: int, total: int, bar_w: int, utf8: bool, style: str, numbers: str) -> Line:
    return [(_cell(label, _LABEL_W) + " [", PLAIN), (bar(used, total, bar_w, utf8), style), (f"] {numbers}", PLAIN)]


def _model_table(view: View, width: int, utf8: bool) -> list[Line]:
    # the name column fits the longest name (up to 64 characters), as far as the screen allows
    name_w = min(max([len(m["Name"]) + 3 for m in view.models] + [12]), max(width - 67, 12))
    columns = [("NAME", name_w), ("STATE", 9), ("OWNER", 10), ("PID", 8), ("VRAM", 11), ("SNAPSHOT", 11)]
    columns.append(("FREEZE/THAW", 16))
    lines: list[Line] = [[("  " + "".join(_cell(title, w) for title, w in columns), BOLD)]]
    lines += [_model_row(model, name_w, model["Name"] == view.selected, utf8) for model in view.models]
    if not view.models:
        lines.append([("  No models. Start one with: gpusched run --name NAME -- COMMAND", DIM)])
    return lines


def _model_row(model: dict[str, Any], name_w: int, selected: bool, utf8: bool) -> Line:
    name, state = model["Name"], model["State"]
    glyph = GLYPHS.get(state, ("o", "0"))[0] if utf8 else state[0]
    times = (
        f"{model['LastFreezeUSec'] / 1e6:.2f}/{model['LastThawUSec'] / 1e6:.2f} s"
        if model["LastFreezeUSec"] or model["LastThawUSec"]
        else "-"
    )
    cells = [
        _cell(f"{glyph} {name}", name_w),
        _cell(state, 9),
        _cell(user_name(model["Owner"]), 10),
        _cell(str(model["MainPid"] or "-"), 8),
        _cell(human_bytes(model["VramBytes"]) if model["VramBytes"] else "-", 11),
        _cell(human_bytes(model["SnapshotBytes"]) if model["SnapshotBytes"] else "-", 11),
        _cell(times, 16),
    ]
    if selected:
        return [("> " + "".join(cells), SELECTED)]
    return [("  " + cells[0], PLAIN), (cells[1], STATE_STYLE.get(state, PLAIN)), ("".join(cells[2:]), PLAIN)]


def _event_log(view: View, room: int) -> list[Line]:
    lines: list[Line] = [[("Events", BOLD)]]
    for event in list(view.events)[-room:]:
        stamp = event.time.strftime("%H:%M:%S")
        lines.append(
            [
                (f"{stamp} {event.event:<8} {event.model or '-':<20} ", DIM),
                (event.message, PRIORITY_STYLE.get(event.priority, PLAIN)),
            ]
        )
    return lines


def _status(view: View, now: float) -> Segment:
    """The line above the keys: the call under way, the question being asked, or the last call's outcome."""
    if view.busy:
        return (f"{view.busy}... {now - view.busy_since:.1f} s", WARN)
    if view.swap_out:
        return (f"Swap {view.swap_out} out for which model? Select it and press Enter (Esc: cancel)", WARN)
    if view.confirm_stop:
        return (f"Stop {view.confirm_stop}? y: stop it, any other key: keep it", WARN)
    return view.message


def _clip(line: Line, width: int) -> Line:
    out: Line = []
    left = width
    for text, style in line:
        if left <= 0:
            break
        out.append((text[:left], style))
        left -= len(text[:left])
    return out


class Dashboard:
    """The live part: the daemon's state into a View, keys into calls, the View onto the screen."""

    def __init__(self, client: AsyncGpuSched, screen: Any) -> None:
        self.client = client
        self.screen = screen
        self.view = View()
        self.utf8 = locale.getpreferredencoding(False).upper().replace("-", "") == "UTF8"
        self.dirty = asyncio.Event()
        self.quit = False
        self.task: asyncio.Task[None] | None = None
        self.styles: dict[str, int] = {}

    # ------------------------------------------------------------- data

    async def refresh(self) -> None:
        try:
            manager = await self.client.status()
            models = []
            for info in sorted(await self.client.models(), key=lambda m: m.name):
                with contextlib.suppress(GpuschedError):  # gone between the two calls
                    models.append(await self.client.model(info.name))
        except (GpuschedError, OSError) as e:
            self.view.error = f"gpuschedd cannot be reached: {getattr(e, 'message', e)}"
            return
        self.view.manager, self.view.models, self.view.error = manager, models, ""
        if self.view.selected not in self.view.names():
            self.view.select(0)

    async def poll(self) -> None:
        while not self.quit:
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), REFRESH_SEC)
            self.dirty.clear()

    async def follow_signals(self) -> None:
        with contextlib.suppress(GpuschedError, OSError):
            async with EventStream(self.client) as stream:
                async for _ in stream:
                    self.dirty.set()

    async def follow_journal(self) -> None:
        argv = eventlog.journalctl_argv(lines=EVENT_BACKLOG, follow=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
        except OSError:
            self.view.message = ("No event log: journalctl cannot be run", WARN)
            return
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                for event in eventlog.parse_lines(iter([raw.decode(errors="replace")])):
                    self.view.events.append(event)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()

    # ------------------------------------------------------------- actions

    def start(self, what: str, call: Callable[[], Awaitable[None]], done: str) -> None:
        if self.task is not None and not self.task.done():
            self.view.message = (f"Wait: {self.view.busy} is under way", WARN)
            return

        async def go() -> None:
            self.view.busy, self.view.busy_since = what, time.monotonic()
            try:
                await call()
            except GpuschedError as e:
                self.view.message = (f"{what} failed: {e.message} ({e.dbus_name})", BAD)
            else:
                self.view.message = (f"{done} in {time.monotonic() - self.view.busy_since:.2f} s", GOOD)
            finally:
                self.view.busy = ""
                self.dirty.set()

        self.task = asyncio.ensure_future(go())

    def state_of(self, name: str) -> str:
        return next((m["State"] for m in self.view.models if m["Name"] == name), "")

    def key(self, key: int) -> None:
        view, name = self.view, self.view.selected
        if view.confirm_stop:
            target, view.confirm_stop = view.confirm_stop, ""
            if key in (ord("y"), ord("Y")):
                self.start(f"Stopping {target}", lambda: self.client.stop(target), f"Stopped {target}")
            else:
                view.message = (f"{target} keeps running", PLAIN)
            return
        if key in (curses.KEY_UP, ord("k")):
            view.select(-1)
        elif key in (curses.KEY_DOWN, ord("j")):
            view.select(1)
        elif key == 27:  # Esc
            view.swap_out = ""
            view.message = ("", PLAIN)
        elif view.swap_out and key in (curses.KEY_ENTER, 10, 13):
            out, view.swap_out = view.swap_out, ""
            if name and name != out:
                self.start(
                    f"Swapping {out} out, {name} in", lambda: self.client.swap(out, name), f"Swapped {out}/{name}"
                )
            else:
                view.message = ("Pick another model to thaw", WARN)
        elif key in (ord("q"), ord("Q")):
            self.quit = True
        elif key == ord("r"):
            self.dirty.set()
        elif not name:
            return
        elif key in (ord("f"), ord("t")) and self.state_of(name) == ("frozen" if key == ord("f") else "running"):
            view.message = (f"{name} is already {self.state_of(name)}", PLAIN)
        elif key == ord("f"):
            self.start(f"Freezing {name}", lambda: self.client.freeze(name), f"Froze {name}")
        elif key == ord("t"):
            self.start(f"Thawing {name}", lambda: self.client.thaw(name), f"Thawed {name}")
        elif key == ord("s"):
            view.swap_out = name
        elif key == ord("x"):
            view.confirm_stop = name

    # ------------------------------------------------------------- screen

    def setup_screen(self) -> None:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        self.screen.nodelay(True)
        self.screen.keypad(True)
        self.styles = {PLAIN: 0, BOLD: curses.A_BOLD, DIM: curses.A_DIM, SELECTED: curses.A_REVERSE}
        colors = {GOOD: curses.COLOR_GREEN, WARN: curses.COLOR_YELLOW, BAD: curses.COLOR_RED, COLD: curses.COLOR_CYAN}
        if curses.has_colors():
            curses.start_color()
            with contextlib.suppress(curses.error):
                curses.use_default_colors()
            for i, (style, color) in enumerate(colors.items(), start=1):
                with contextlib.suppress(curses.error):
                    curses.init_pair(i, color, -1)
                self.styles[style] = curses.color_pair(i)
        for style in colors:
            self.styles.setdefault(style, curses.A_BOLD)

    def fit(self) -> None:
        """Follow the terminal's size. curses learns it from SIGWINCH, which a parent may have set to be ignored
        (then curses keeps its first idea, or terminfo's 80x24): ask the terminal itself."""
        try:
            size = os.get_terminal_size(sys.__stdout__.fileno() if sys.__stdout__ else 1)
        except OSError:
            return
        if (size.lines, size.columns) != self.screen.getmaxyx():
            with contextlib.suppress(curses.error):
                curses.resizeterm(size.lines, size.columns)

    def draw(self) -> None:
        self.fit()
        height, width = self.screen.getmaxyx()
        self.screen.erase()
        for y, line in enumerate(render(self.view, width - 1, height, self.utf8)):
            x = 0
            for text, style in line:
                with contextlib.suppress(curses.error):
                    self.screen.addstr(y, x, text, self.styles.get(style, 0))
                x += len(text)
        self.screen.refresh()

    async def run(self) -> None:
        self.setup_screen()
        await self.refresh()
        tasks = [asyncio.ensure_future(c) for c in (self.poll(), self.follow_signals(), self.follow_journal())]
        try:
            while not self.quit:
                while (key := self.screen.getch()) != -1:
                    if key == curses.KEY_RESIZE:
                        continue
                    self.key(key)
                self.draw()
                await asyncio.sleep(FRAME_SEC)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def run_dashboard(interactive: bool = True) -> int:
    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")  # Esc answers at once, not after curses' default 1 s

    def main(screen: Any) -> None:
        async def go() -> None:
            async with AsyncGpuSched(interactive=interactive) as client:
                await Dashboard(client, screen).run()

        asyncio.run(go())

    curses.wrapper(main)
    return 0
