"""The event history, read back from the journal: the entries gpuschedd wrote (journal.py), found by their
MESSAGE_IDs through journalctl. No journal library is needed, and what a user may read is what journald lets
them read (root, and the groups systemd-journal and adm, see the system's entries; journalctl says so otherwise).

Only entries from uid 0 count (`_UID=0`, a field journald sets itself): anyone may log a line with our
MESSAGE_ID, nobody but root can make it look like the daemon's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .events import MESSAGE_IDS

JOURNALCTL = "journalctl"
# The fields every entry may carry, turned into attributes; the rest of GPUSCHED_* go to `fields`.
_KNOWN = {
    "GPUSCHED_EVENT",
    "GPUSCHED_MODEL",
    "OBJECT_SYSTEMD_UNIT",
    "GPUSCHED_DURATION_USEC",
    "GPUSCHED_BYTES",
    "GPUSCHED_GPUS",
}


@dataclass(frozen=True)
class JournalEvent:
    timestamp_usec: int
    event: str
    model: str
    unit: str
    message: str
    priority: int
    duration_usec: int = 0
    bytes: int = 0
    gpus: list[str] = field(default_factory=list)
    # GPUSCHED_ERROR, GPUSCHED_METHOD, GPUSCHED_CALLER_UID, GPUSCHED_RESULT, GPUSCHED_SWAP_OUT, ... as written
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_usec / 1e6).astimezone()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["time"] = self.time.isoformat(timespec="microseconds")
        return out


def _text(value: Any) -> str:
    """journalctl -o json writes a field as a string, as a byte array when it is not UTF-8 text, and as a list
    when an entry has the field more than once (the first counts)."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        value = value[0]
    if isinstance(value, list):
        return bytes(value).decode(errors="replace")
    return "" if value is None else str(value)


def _int(value: Any) -> int:
    try:
        return int(_text(value))
    except ValueError:
        return 0


def parse_entry(entry: dict[str, Any]) -> JournalEvent:
    """One `journalctl -o json` object as a JournalEvent."""
    return JournalEvent(
        timestamp_usec=_int(entry.get("__REALTIME_TIMESTAMP")),
        event=_text(entry.get("GPUSCHED_EVENT")),
        model=_text(entry.get("GPUSCHED_MODEL")),
        unit=_text(entry.get("OBJECT_SYSTEMD_UNIT")),
        message=_text(entry.get("MESSAGE")),
        priority=_int(entry.get("PRIORITY", 5)),
        duration_usec=_int(entry.get("GPUSCHED_DURATION_USEC", 0)),
        bytes=_int(entry.get("GPUSCHED_BYTES", 0)),
        gpus=_text(entry.get("GPUSCHED_GPUS")).split(),
        fields={key: _text(value) for key, value in entry.items() if key.startswith("GPUSCHED_") and key not in _KNOWN},
    )


def journalctl_argv(
    model: str | None = None, since: str | None = None, lines: int | None = None, follow: bool = False
) -> list[str]:
    """journalctl reading our entries: every MESSAGE_ID (one field given several times: any of them), from root,
    of one model if asked. `since` is passed on as journalctl reads it ("today", "-1h", "2025-01-31 12:00")."""
    argv = [JOURNALCTL, "--no-pager", "--output=json", "--quiet"]
    if since:
        argv.append(f"--since={since}")
    if lines is not None:
        argv.append(f"--lines={lines}")
    if follow:
        argv.append("--follow")
    argv += [f"MESSAGE_ID={message_id}" for message_id in MESSAGE_IDS.values()]
    argv.append("_UID=0")
    if model:
        argv.append(f"GPUSCHED_MODEL={model}")
    return argv


def parse_lines(lines: Iterator[str]) -> Iterator[JournalEvent]:
    """`journalctl -o json` lines as events (a line that is not JSON is skipped)."""
    for line in lines:
        line = line.strip()
        if line:
            try:
                yield parse_entry(json.loads(line))
            except json.JSONDecodeError:
                continue


def read(model: str | None = None, since: str | None = None, lines: int | None = None) -> list[JournalEvent]:
    """The events so far, oldest first. journalctl's own complaints (no permission to read the system journal, a
    bad --since) go to stderr as they are; a failure raises CalledProcessError."""
    proc = subprocess.run(
        journalctl_argv(model, since, lines), stdout=subprocess.PIPE, text=True, errors="replace", check=True
    )
    return list(parse_lines(iter(proc.stdout.splitlines())))


def follow(model: str | None = None, since: str | None = None, lines: int | None = None) -> Iterator[JournalEvent]:
    """The last `lines` events (journalctl's default of 10 without), then each new one as it is written."""
    with subprocess.Popen(
        journalctl_argv(model, since, lines, follow=True), stdout=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        try:
            yield from parse_lines(iter(proc.stdout.readline, ""))
        finally:
            proc.terminate()
        if proc.wait() not in (0, -15):
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
