"""The shipped journal catalog explains every MESSAGE_ID the daemon writes, cites only fields its messages always
carry, and is read by journalctl itself (tests/system/test_journal.py shows it under a real freeze)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fake_units import FakeUnits

from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.events import EngineListener, Event, EventKind, timespan
from gpuschedd.journal import MESSAGE_IDS, journal_fields
from gpuschedd.options import RunOptions
from gpuschedd.telemetry import NoGpus

CATALOG = Path(__file__).resolve().parents[2] / "catalog" / "gpuschedd.catalog"

# What each kind's emitter always adds beyond the common fields (engine.py, bus/service.py).
KIND_FIELDS: dict[EventKind, dict[str, str]] = {
    EventKind.EXIT: {"GPUSCHED_RESULT": "exit-code"},
    EventKind.SWAP: {"GPUSCHED_SWAP_OUT": "other", "GPUSCHED_OVERLAPPED": "1"},
    EventKind.PAGE_OUT: {"GPUSCHED_SWAP_BYTES": "1", "GPUSCHED_FILE_BYTES": "0", "GPUSCHED_RAM_BYTES": "0"},
    EventKind.FAILURE: {"GPUSCHED_ERROR": "org.gpusched1.Error.CheckpointFailed"},
    EventKind.REFUSAL: {"GPUSCHED_ERROR": "org.freedesktop.DBus.Error.AccessDenied"},
}


def entries() -> dict[str, tuple[dict[str, str], str]]:
    """message id → (headers, body), parsed like systemd's catalog.c: `-- ID`, headers up to a blank line, body."""
    out: dict[str, tuple[dict[str, str], str]] = {}
    lines = [line for line in CATALOG.read_text().splitlines() if not line.startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.startswith("-- ")]
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        message_id = lines[start][3:].strip()
        assert message_id not in out, f"{message_id} twice"
        block = lines[start + 1 : end]
        blank = block.index("")
        headers = dict(line.split(": ", 1) for line in block[:blank])
        out[message_id] = (headers, "\n".join(block[blank + 1 :]))
    return out


def test_one_entry_per_message_id() -> None:
    assert set(entries()) == set(MESSAGE_IDS.values())
    for message_id, (headers, body) in entries().items():
        assert re.fullmatch(r"[0-9a-f]{32}", message_id)
        assert headers.keys() == {"Subject", "Defined-By", "Support", "Documentation"}, message_id
        assert headers["Defined-By"] == "gpuschedd"
        assert body.strip(), f"{message_id} explains nothing"


@pytest.mark.parametrize("kind", list(EventKind))
def test_entries_cite_only_fields_the_messages_carry(kind: EventKind) -> None:
    event = Event(kind, "llama", "gpusched-model@llama.service", "text", fields=KIND_FIELDS.get(kind, {}))
    carried = journal_fields(event)
    headers, body = entries()[MESSAGE_IDS[kind]]
    cited = set(re.findall(r"@([A-Z0-9_]+)@", headers["Subject"] + body))
    assert cited <= carried.keys(), f"{kind}: cites {cited - carried.keys()}, which its messages may lack"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="no journalctl")
def test_journalctl_reads_the_catalog(tmp_path: Path) -> None:
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    (tmp_path / "var/lib/systemd/catalog").mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir)
    update = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True, check=True
    )
    assert update.stderr == ""
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"], capture_output=True, text=True, check=True
    ).stdout
    assert {line.split()[0] for line in listed.splitlines()} == set(MESSAGE_IDS.values())


# Every value of GPUSCHED_FREEZE_PATH= (the model's FreezePath) that engine/freeze.py sets.
FREEZE_PATHS = ("driver", "agent", "agent-only", "cgroup")


@pytest.mark.parametrize("kind", [EventKind.FREEZE, EventKind.THAW])
def test_freeze_and_thaw_explain_every_path(kind: EventKind) -> None:
    """A catalog text cannot branch: the freeze and thaw entries list every path, each under its field value."""
    _headers, body = entries()[MESSAGE_IDS[kind]]
    for path in FREEZE_PATHS:
        assert re.search(rf"^  {re.escape(path)} +\S", body, re.M), f"{kind}: {path} not explained"


async def test_a_freeze_without_checkpoint_is_not_called_one() -> None:
    """CheckpointBackend none: the entries say the cgroup path (nothing checkpointed, GPU memory held), and the
    durations are also written for people."""
    engine = Engine(FakeUnits(), NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1 << 30))
    seen: list[Event] = []
    listener = EngineListener()
    listener.event = seen.append  # type: ignore[method-assign]
    engine.add_listener(listener)
    await engine.start()
    await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("llama")
    await engine.thaw("llama")
    freeze, thaw = (journal_fields(e) for e in seen if e.kind in (EventKind.FREEZE, EventKind.THAW))
    assert (freeze["GPUSCHED_FREEZE_PATH"], freeze["GPUSCHED_CHECKPOINT_BACKEND"]) == ("cgroup", "none")
    assert thaw["GPUSCHED_FREEZE_PATH"] == "cgroup"
    assert engine.models["llama"].freeze_path == "cgroup"
    assert freeze["GPUSCHED_DURATION"] == timespan(int(freeze["GPUSCHED_DURATION_USEC"]))
    _headers, body = entries()[MESSAGE_IDS[EventKind.FREEZE]]
    assert "cgroup      no process was checkpointed" in body


@pytest.mark.parametrize(
    ("usec", "text"),
    [(0, "0.000s"), (860_000, "0.860s"), (7_312_345, "7.312s"), (63_200_000, "1min 3.200s"), (3_723e6, "1h 2min 3s")],
)
def test_timespan(usec: int, text: str) -> None:
    assert timespan(int(usec)) == text
