"""The model table on disk, so a restarted daemon remembers what the units cannot tell it.

systemd knows which units run and whether their cgroups are frozen; the driver knows each PID's checkpoint state.
Neither knows how much VRAM a frozen model held on each GPU (what its thaw needs free), how big its snapshot is, or
that it was in the middle of a freeze or a thaw when the daemon died. That is what this file keeps.

It lives in the runtime directory (/run/gpuschedd: RuntimeDirectoryPreserve=yes keeps it across restarts, and a
reboot, which ends every model too, clears it). It is rewritten whole on every transition: JSON into a temporary
file, then rename(2) over the old one, so a reader (a restarted daemon) sees the old table or the new one, never
half of one. The write happens on the event loop without an await, so it is a consistent picture of every model
without taking any model's lock (each model as it is then: its record, kept between saves, is encoded again when
any of its values moved, so a transition encodes one model, not the table). /run is a tmpfs: a daemon killed at any
point leaves the last complete file behind (no fsync is needed against a process crash; a power loss ends the models
as well).

The file is the daemon's alone, whatever the unit's UMask=: it is created 0600 with O_EXCL|O_NOFOLLOW under a
random name in the directory (mkstemp), so no link planted there is followed, then renamed. It is not fsync'd: on
the tmpfs it lives on that does nothing, and where RUNTIME_DIRECTORY points at a disk a power loss ends the models
too and the file's boot ID makes the next boot ignore it (a torn or empty file is ignored as unreadable).

The file records the boot it was written in; a file from another boot is ignored.

When a write fails (the directory full or read-only), the file on disk still holds the last table that could be
written: a picture of an earlier moment. That is loud (an error in the journal, STATUS= degraded, until a later
write succeeds; every change retries) and it is kept, not removed, because what it claims stays safe to act on:
- the states it saves are never trusted over the truth: a restart asks systemd and the driver (recovery.py);
- a model it lists that has since ended is found ended (its unit is gone), one added since is taken over from its
  unit;
- its forgotten units stay forgotten (removing the file would lose them: every unit would be taken over);
- the one claim that would be wrong is a model forgotten since (it would be taken over again): so Forget, whose
  only record is this file, is refused while the table cannot be written (Engine.forget)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import operator
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .model import Model, State, now_usec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_NAME = "models.json"
DEFAULT_DIR = "/run/gpuschedd"


def default_path() -> str:
    """$RUNTIME_DIRECTORY (set by systemd from RuntimeDirectory=) or /run/gpuschedd, plus models.json."""
    directory = (os.environ.get("RUNTIME_DIRECTORY") or DEFAULT_DIR).split(":")[0]
    return os.path.join(directory, FILE_NAME)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# How a record's value becomes a Model field's, by the field's type (model.py's annotations, as strings): the
# record's fields follow the Model's, so a field added there is saved and loaded without an edit here.
_READ: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "State": State,
    "list[str]": lambda value: [str(x) for x in value],
    "list[int]": lambda value: [int(x) for x in value],
    "dict[str, int]": lambda value: {str(k): int(v) for k, v in dict(value).items()},
}
# Saved: every field but the lock. Required in a record: the identity and the state; the rest have defaults.
_SAVED = [f for f in dataclasses.fields(Model) if f.compare]
_NAMES = tuple(f.name for f in _SAVED)
_GET = operator.attrgetter(*_NAMES)
_CONTAINERS = [i for i, f in enumerate(_SAVED) if str(f.type).startswith(("list[", "dict["))]
_REQUIRED = ("name", "unit", "owner", "state")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def model_to_dict(model: Model) -> dict[str, Any]:
    return {f.name: _plain(getattr(model, f.name)) for f in _SAVED}


def _values(model: Model) -> list[Any]:
    """What its record holds, in the record's order, read at C speed: the containers copied (so a list changed in
    place later compares unequal to what was saved); a State as it is (JSON writes it as its string)."""
    values = list(_GET(model))
    for i in _CONTAINERS:
        values[i] = values[i].copy()
    return values


def _plain(value: Any) -> Any:
    """A field's value as JSON has it: a State as its string, containers copied."""
    if isinstance(value, State):
        return str(value)
    return type(value)(value) if isinstance(value, list | dict) else value


def model_from_dict(data: dict[str, Any]) -> Model:
    """A Model from its record; raises (KeyError, ValueError, TypeError) on a malformed one. A field the record
    lacks (written by an older daemon) takes the Model's default; a record never active takes now."""
    values = {f.name: _READ[str(f.type)](data[f.name]) for f in _SAVED if f.name in data or f.name in _REQUIRED}
    model = Model(**values)
    model.last_active_usec = model.last_active_usec or now_usec()
    return model


@dataclass
class SavedTable:
    """What a previous daemon left: its models by name; the units it was told to forget (unit → main PID, so a
    forgotten unit is not taken over again after a restart, while a new unit of the same name is); the swaps it was
    in the middle of (freeze name, thaw name); and the models it was stopping."""

    models: dict[str, Model] = field(default_factory=dict)
    forgotten: dict[str, int] = field(default_factory=dict)
    swaps: list[tuple[str, str]] = field(default_factory=list)
    stopping: set[str] = field(default_factory=set)


class StateFile:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_path()
        self._boot = boot_id()
        # Why the last write failed; None when the file holds the current table.
        self.error: str | None = None
        self.writes = 0
        # Each model's record as last written (name → its values and their JSON text): a save encodes again only
        # the records whose values moved, a transition usually one; the file is still the whole table.
        self._records: dict[str, tuple[list[Any], str]] = {}

    def _record(self, model: Model) -> tuple[list[Any], str]:
        values = _values(model)
        kept = self._records.get(model.name)
        if kept is not None and kept[0] == values:
            return kept
        return values, _json(dict(zip(_NAMES, values, strict=True)))

    def save(
        self,
        models: list[Model],
        forgotten: dict[str, int],
        swaps: list[tuple[str, str]],
        stopping: set[str] | None = None,
    ) -> None:
        """Write the whole table atomically. A failure is logged and kept in `error` (STATUS= shows it), never
        raised: an operation that worked must not be reported failed because /run is full (the module's docstring
        says why the older file left behind is safe)."""
        records = {m.name: self._record(m) for m in models}
        # What json.dumps of the whole table gives, with the models' records as kept
        text = (
            f'{{"version":{FORMAT_VERSION},"boot_id":{_json(self._boot)},'
            f'"models":[{",".join(record for _kept, record in records.values())}],"forgotten":{_json(forgotten)},'
            f'"swaps":{_json([list(s) for s in swaps])},"stopping":{_json(sorted(stopping or ()))}}}'
        )
        directory = os.path.dirname(self.path) or "."
        tmp = ""
        try:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=directory)  # O_EXCL|O_NOFOLLOW, 0600
            except FileNotFoundError:  # made when missing, not checked on every transition
                os.makedirs(directory, mode=0o700, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=directory)
            try:
                os.fchmod(fd, 0o600)  # mkstemp's 0600 is masked by the umask; the file must not depend on it
                # json.dumps, never json.dump (it streams through the pure-Python encoder, several times slower); bytes
                # straight to the descriptor, without a text file object around it. No fsync (module docstring).
                payload = memoryview(text.encode())
                while payload:
                    payload = payload[os.write(fd, payload) :]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            if self.error is None:
                log.error(
                    "cannot save the model table to %s: %s (retried on every change; until then a restart sees an"
                    " older table, and Forget is refused)",
                    self.path,
                    e,
                )
            self.error = f"cannot save the model table: {e.strerror or e}"
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return
        if self.error is not None:
            log.warning("the model table is saved again to %s", self.path)
            self.error = None
        self._records = records  # those of models no longer in the table go
        self.writes += 1

    def load(self) -> SavedTable:
        """The table a previous daemon of this boot saved; empty when there is none or it cannot be read."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return SavedTable()
        except (OSError, ValueError) as e:
            log.error("ignoring the saved model table %s: %s", self.path, e)
            return SavedTable()
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            log.warning("ignoring the saved model table %s: unknown format", self.path)
            return SavedTable()
        if data.get("boot_id") != self._boot:
            log.info("ignoring the saved model table %s: written before the last boot", self.path)
            return SavedTable()
        table = SavedTable()
        for record in data.get("models", []):
            try:
                model = model_from_dict(record)
            except (KeyError, ValueError, TypeError) as e:
                log.error("ignoring a malformed record in %s: %s", self.path, e)
                continue
            table.models[model.name] = model
        with contextlib.suppress(AttributeError, ValueError, TypeError):
            table.forgotten = {str(k): int(v) for k, v in data.get("forgotten", {}).items()}
        with contextlib.suppress(AttributeError, ValueError, TypeError):
            table.swaps = [(str(a), str(b)) for a, b in data.get("swaps", [])]
        with contextlib.suppress(ValueError, TypeError):
            table.stopping = {str(name) for name in data.get("stopping", [])}
        return table
