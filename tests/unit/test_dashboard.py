"""The dashboard's screen as text and its keys as calls, without a terminal or a daemon (tests/system/test_dashboard.py
drives the real one under tmux)."""

from __future__ import annotations

from typing import Any

from gpuschedd import dashboard
from gpuschedd.dashboard import Dashboard, View, bar, render
from gpuschedd.eventlog import JournalEvent

GIB = 1 << 30


def model(name: str, state: str = "running", vram: int = 0, snapshot: int = 0) -> dict[str, Any]:
    return {
        "Name": name,
        "State": state,
        "Owner": 0,
        "MainPid": 42,
        "VramBytes": vram,
        "SnapshotBytes": snapshot,
        "LastFreezeUSec": 860_000 if snapshot else 0,
        "LastThawUSec": 0,
    }


def view() -> View:
    v = View(
        manager={
            "Version": "0.1.0",
            "CheckpointBackend": "driver",
            "UnitBackend": "systemd",
            "TransparentHugepages": "madvise",
            "Gpus": [{"index": 0, "name": "NVIDIA H100", "uuid": "GPU-x", "used": 20 * GIB, "total": 80 * GIB}],
            "RamFrozenBytes": 2 * GIB,
            "RamBudgetBytes": 8 * GIB,
        },
        models=[model("llama", vram=16 * GIB), model("mistral", "frozen", snapshot=2 * GIB)],
        selected="mistral",
    )
    v.events.append(JournalEvent(1_700_000_000_000_000, "freeze", "mistral", "", "model mistral frozen in 0.860s", 5))
    return v


def text(lines: list[dashboard.Line]) -> list[str]:
    return ["".join(t for t, _ in line) for line in lines]


def test_bars() -> None:
    assert bar(1, 4, 8, utf8=True) == "██░░░░░░"
    assert bar(5, 4, 4, utf8=False) == "####" and bar(0, 0, 3, utf8=False) == "..."


def test_screen_shows_bars_models_events_and_keys() -> None:
    screen = text(render(view(), 120, 30, now=0))
    assert len(screen) == 30 and all(len(line) <= 120 for line in screen)
    assert screen[0].startswith("gpuschedd 0.1.0 - 1 running, 1 frozen - checkpoint driver, units systemd, THP madvise")
    gpu = next(line for line in screen if line.startswith("GPU 0 NVIDIA H100"))
    filled = gpu.count("█")
    assert filled and round(filled / (filled + gpu.count("░")), 1) == 0.2 and "20.0 GiB used of 80.0 GiB" in gpu
    ram = next(line for line in screen if line.startswith("Host RAM"))
    assert "2.0 GiB of 8.0 GiB budget" in ram
    rows = {line[4:].split()[0]: line for line in screen if line[2:4] in ("● ", "❄ ")}
    assert rows["llama"].startswith("  ● llama") and "16.0 GiB" in rows["llama"]
    assert rows["mistral"].startswith("> ❄ mistral") and "0.86/0.00 s" in rows["mistral"]
    assert any("freeze   mistral" in line and "frozen in 0.860s" in line for line in screen)
    assert screen[-1].startswith("↑↓ select  f freeze")


def test_small_screens_and_plain_terminals() -> None:
    screen = text(render(view(), 60, 8, utf8=False, now=0))
    assert len(screen) == 8 and all(len(line) <= 60 for line in screen)
    assert "█" not in "".join(screen) and screen[-1].startswith("up/down select")


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __getattr__(self, verb: str) -> Any:
        async def call(*args: str) -> None:
            self.calls.append((verb, *args))

        return call


async def test_keys_become_calls() -> None:
    client = FakeClient()
    dash = Dashboard(client, screen=None)  # type: ignore[arg-type]
    dash.view = view()
    dash.view.selected = "llama"

    async def press(*keys: str | int) -> None:
        for key in keys:
            dash.key(ord(key) if isinstance(key, str) else key)
            if dash.task is not None:
                await dash.task

    await press("f", "j", "f")  # mistral is frozen already: nothing to call
    assert dash.view.message[0] == "mistral is already frozen"
    await press("k")
    await press("j", "t")
    await press("k", "s", "j", 10)  # swap llama out, mistral in
    await press("x", "n")  # asked, kept
    await press("x", "y")
    assert client.calls == [("freeze", "llama"), ("thaw", "mistral"), ("swap", "llama", "mistral"), ("stop", "mistral")]
    assert dash.view.message[0].startswith("Stopped mistral in ")
    await press("q")
    assert dash.quit


def test_swap_prompt_and_busy_line() -> None:
    v = view()
    v.swap_out = "llama"
    assert text(render(v, 120, 30))[-2].startswith("Swap llama out for which model?")
    v.swap_out, v.busy, v.busy_since = "", "Freezing llama", 10.0
    assert text(render(v, 120, 30, now=12.34))[-2] == "Freezing llama... 2.3 s"
