"""systemd-style settings files, read the one way for every program of the project: one section of a main file and
its drop-ins (PATH.d/*.conf, in lexical order, the last value read winning), applied through a table of
key -> (field, parser) so that an unknown key, a bad value or an unreadable file is one ConfigError naming the
file(s) and the key. The daemon's gpuschedd.conf (config.py) and the front door's frontdoor.conf use it; the
parsers here are the ones both need."""

from __future__ import annotations

import configparser
import glob
import os
from collections.abc import Callable, Collection
from typing import TypeVar

T = TypeVar("T")
Table = dict[str, tuple[str, Callable[[str], object]]]


class ConfigError(ValueError):
    pass


def parse_boolean(text: str) -> bool:
    """systemd's booleans: yes/no, true/false, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1", "y", "t"):
        return True
    if value in ("no", "false", "off", "0", "n", "f"):
        return False
    raise ValueError("expected yes or no")


def parse_count(text: str) -> int:
    """A whole number, 0 or more (0: off)."""
    if not text.strip().isdigit():
        raise ValueError("expected a whole number (0: off)")
    return int(text)


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None


def parse_listen(text: str) -> str:
    """HOST:PORT, or empty (off)."""
    host, _, port = text.rpartition(":")
    if text and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError("expected HOST:PORT")
    return text


def read_section(path: str, section: str) -> tuple[dict[str, str], str]:
    """[section] of `path` and of its drop-ins, and the files it came from (for errors). strict=False: a key or
    section given twice is no error, the last one wins (systemd's rule), also across files. A missing main file is
    no error: every setting has a default."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"), strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    dropins = sorted(glob.glob(os.path.join(glob.escape(path + ".d"), "*.conf")))
    for name in [path, *dropins]:
        try:
            with open(name) as f:
                parser.read_file(f)
        except FileNotFoundError:
            pass
        except configparser.Error as e:
            raise ConfigError(f"{name}: {e.message}") from None
    where = f"{path} (and {', '.join(dropins)})" if dropins else path
    return (dict(parser[section]) if parser.has_section(section) else {}), where


def parsed(where: str, key: str, parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as e:  # ConfigError included
        raise ConfigError(f"{where}: {key}={text}: {e}") from None


def apply(
    target: object, table: Table, values: dict[str, str], where: str, section: str, also: Collection[str] = ()
) -> None:
    """Set on `target` every setting of `table` that `values` has; a key in neither `table` nor `also` (the ones
    the caller reads itself) is a ConfigError."""
    unknown = set(values) - set(table) - set(also)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}")
    for key, (attr, parse) in table.items():
        if key in values:
            setattr(target, attr, parsed(where, key, parse, values[key]))
