"""The model catalog: one file per model, /etc/gpusched/models.d/NAME.conf (the admin's) over
/usr/lib/gpusched/models.d/NAME.conf (the vendor's), read at start and on reload (man gpusched-models.d(5)).

A file is systemd-style INI (systemd.syntax(7)) with one section, [Model]: Command= and User= (both required),
Aliases=, Preload=, and every option of Run by its D-Bus key. The keys and their checks are options.py's
declarations, the same that parse Run's a{sv} on the bus: a value is read from text by the option's D-Bus type
(b: a systemd boolean, i/u/t/q: a number, `size` options 8G, as: space-separated words) and then goes through the
option's own check, so a catalog file can ask for nothing Run would refuse.

configparser (what config.py reads gpuschedd.conf with) keeps neither line numbers nor repeated keys; a catalog
error must name its line, and Environment= repeats as in a unit file. So the lines are read here, by
systemd.syntax(7)'s rules: `#` and `;` start a comment line (never mid-line: a `#` in a command is the command's),
a trailing backslash continues a line, a key given twice keeps its last value (a list option: every value; an
empty assignment empties the list).

The files run processes as any user, so only root's files are read: a file (or a directory) that is not owned by
root, or that others may write, is refused. A file of the same name in /etc masks the vendor's; a symlink to
/dev/null masks it without replacing it, as systemd does. A bad file is refused whole (one error naming the file
and line); the others still load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pwd
import shlex
import stat
from dataclasses import dataclass, field
from typing import Any

from . import config, names, options, validate
from .errors import GpuschedError
from .options import Option, RunOptions

DIRS = ("/etc/gpusched/models.d", "/usr/lib/gpusched/models.d")
SUFFIX = ".conf"
SECTION = "Model"
MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 32
# The D-Bus integer types of options.py, and the values each can carry.
_INT_RANGES = {"i": (-(1 << 31), (1 << 31) - 1), "u": (0, (1 << 32) - 1), "t": (0, (1 << 64) - 1), "q": (0, 65535)}


class CatalogError(ValueError):
    """Why a file is refused; `line`: where (0: the file as a whole)."""

    def __init__(self, why: str, line: int = 0) -> None:
        super().__init__(why)
        self.line = line


@dataclass(frozen=True)
class Entry:
    """One catalog model: what Start runs (argv as `user`, with Run's options), and what the front door routes."""

    name: str
    path: str
    argv: list[str]
    user: str
    uid: int
    options: RunOptions
    aliases: list[str] = field(default_factory=list)
    preload: bool = False

    @property
    def digest(self) -> str:
        """The definition's fingerprint (not where it was read from): a model keeps it, so a reload (or a restarted
        daemon) knows whether the file changed since the model was listed or started."""
        what = [self.argv, self.user, dataclasses.asdict(self.options), self.aliases, self.preload]
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass
class Catalog:
    """What one reading of the directories found: the entries by name, and one error line per refused file."""

    entries: dict[str, Entry] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def read(dirs: tuple[str, ...] = DIRS, owner: int = 0) -> Catalog:
    """Every catalog file of `dirs` (the first directory's file of a name masks the later ones'). `owner`: the only
    uid whose files are read (root; the unit tests' own uid)."""
    found: dict[str, str] = {}
    catalog = Catalog()
    for directory in dirs:
        try:
            _check_owner(os.stat(directory), owner)
            names_here = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        except (OSError, CatalogError) as e:
            catalog.errors.append(f"{validate.shown(directory)}: {_why(e)}: the directory is ignored")
            continue
        for file_name in names_here:
            if file_name.endswith(SUFFIX) and not file_name.startswith("."):
                found.setdefault(file_name, os.path.join(directory, file_name))
    claimed: set[str] = {file_name.removesuffix(SUFFIX) for file_name in found}
    for _file_name, path in sorted(found.items()):
        try:
            entry = read_file(path, owner)
            if entry is not None:
                _claim_aliases(entry, claimed)
                catalog.entries[entry.name] = entry
        except (OSError, CatalogError) as e:
            line = getattr(e, "line", 0)
            where = validate.shown(path) + (f":{line}" if line else "")  # a file name may hold a newline
            catalog.errors.append(f"{where}: {_why(e)}; the file is ignored")
    return catalog


def _why(error: Exception) -> str:
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return validate.shown(text, 512)


def _check_owner(st: os.stat_result, owner: int) -> None:
    if st.st_uid != owner or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CatalogError(
            f"must be owned by uid {owner} and writable by it alone (it is uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o})"
        )


def _claim_aliases(entry: Entry, claimed: set[str]) -> None:
    """An alias names one model: not another file's model, not another model's alias."""
    taken = [alias for alias in entry.aliases if alias in claimed]
    if taken:
        raise CatalogError(f"Aliases={' '.join(taken)}: already the name or an alias of another catalog model")
    claimed.update(entry.aliases)


def read_file(path: str, owner: int = 0) -> Entry | None:
    """One catalog file; None when it is masked (a symlink to /dev/null). Raises CatalogError (with its line) or
    OSError."""
    name = os.path.basename(path).removesuffix(SUFFIX)
    if not names.is_model_name(name):
        raise CatalogError(
            f"{name!r} is not a model name (1-64 letters, digits, '.', '_' or '-', starting with a letter or digit)"
        )
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat("/dev/null").st_rdev:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise CatalogError("not a regular file")
        _check_owner(st, owner)
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise CatalogError(f"longer than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise CatalogError("not UTF-8", data[: e.start].count(b"\n") + 1) from None
    return parse(name, path, text)


def assignments(text: str) -> list[tuple[int, str, str, str]]:
    """(line, section, key, value) of every assignment, in order, by systemd.syntax(7)'s rules (the module's
    docstring). A line that is neither a comment, a [section] nor KEY=VALUE is a CatalogError."""
    out = []
    section = ""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line[:1] in ("#", ";"):
            continue  # a comment inside a continued line is dropped, as systemd does
        if line.endswith("\\"):
            pending, start = pending + line[:-1] + " ", start or number
            continue
        line, number, pending, start = pending + line, start or number, "", 0
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise CatalogError(f"not KEY=VALUE, a [section] or a comment: {validate.shown(line, 80)!r}", number)
        if not section:
            raise CatalogError(f"{key.strip()}= before any section: start the file with [{SECTION}]", number)
        out.append((number, section, key.strip(), value.strip()))
    if pending:
        raise CatalogError("the last line ends with a backslash", start)
    return out


# The keys of [Model] that are not options of Run.
_OWN_KEYS = ("Command", "Aliases", "Preload")


def parse(name: str, path: str, text: str) -> Entry:
    """A catalog file's text as the entry of model `name`. Raises CatalogError naming the line."""
    specs = {spec.key: (f.name, spec) for f, spec in options.declared(RunOptions)}
    values: dict[str, Any] = {}
    own: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for number, section, key, value in assignments(text):
        if section != SECTION:
            raise CatalogError(
                f"unknown section [{validate.shown(section, 40)}]: a catalog file has [{SECTION}] only", number
            )
        lines[key] = number
        try:
            if key in _OWN_KEYS:
                own[key] = _own_value(name, key, value)
            elif key in specs:
                attr, spec = specs[key]
                values[attr] = _option_value(spec, value, values.get(attr))
            else:
                known = ", ".join([*_OWN_KEYS, *specs])
                raise ValueError(f"unknown key; known: {known}")
        except (ValueError, GpuschedError) as e:
            raise CatalogError(f"{key}={validate.shown(value, 80)}: {_message(e)}", number) from None
    if "Command" not in own or not values.get("user"):
        raise CatalogError("Command= and User= are required")
    try:
        run_options = RunOptions(**values)
        if run_options.port or run_options.listen_address:
            options.check_wake_ports(run_options)
        uid = pwd.getpwnam(run_options.user).pw_uid
    except KeyError:
        raise CatalogError(f"User={run_options.user}: no such user", lines["User"]) from None
    except GpuschedError as e:
        raise CatalogError(_message(e), lines.get("Port", lines.get("ListenAddress", 0))) from None
    if name in own.get("Aliases", []):
        raise CatalogError("Aliases= names the model itself", lines["Aliases"])
    return Entry(
        name,
        path,
        own["Command"],
        run_options.user,
        uid,
        run_options,
        own.get("Aliases", []),
        own.get("Preload", False),
    )


def _message(error: Exception) -> str:
    return error.message if isinstance(error, GpuschedError) else str(error)


def _own_value(name: str, key: str, text: str) -> Any:
    if key == "Command":
        try:
            argv = validate.argv(shlex.split(text))
        except ValueError as e:  # shlex: an unclosed quote
            raise ValueError(f"cannot split it: {e}") from None
        if "/" in argv[0] and not argv[0].startswith("/"):
            raise ValueError("the program must be an absolute path, or a name looked up in PATH (as for ExecStart=)")
        return argv
    if key == "Preload":
        return config.parse_boolean(text)
    aliases = text.split()
    bad = [alias for alias in aliases if not names.is_model_name(alias)]
    if bad:
        raise ValueError(f"{validate.shown(bad[0], 80)!r} is not a model name")
    if len(aliases) > MAX_ALIASES:
        raise ValueError(f"more than {MAX_ALIASES} aliases")
    return list(dict.fromkeys(aliases))


def _option_value(spec: Option, text: str, before: Any) -> Any:
    """A Run option from its text, by its D-Bus type (options.py), then through the option's own check. A list option
    given again adds to what it had; given empty, it is emptied (systemd's rule for Environment=)."""
    signature = spec.signatures[0]
    value: Any
    if signature == "b":
        value = config.parse_boolean(text)
    elif signature == "as":
        words = shlex.split(text) if spec.cli == "append" else text.replace(",", " ").split()
        value = [*(before or []), *words] if words else []
    elif spec.cli == "size":
        value = validate.parse_size(text)
    elif signature in _INT_RANGES:
        low, high = _INT_RANGES[signature]
        value = config.parse_int(text)
        if not low <= value <= high:
            raise ValueError(f"out of range {low}-{high}")
    else:
        value = text
    return spec.check(value)
