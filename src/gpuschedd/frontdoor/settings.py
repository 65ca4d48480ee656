"""The front door's settings from /etc/gpusched/frontdoor.conf (systemd-style INI, section [FrontDoor]). The front
door is a client of the daemon (tests/unit/test_layers.py), so it reads its one file itself rather than through the
daemon's config module."""

from __future__ import annotations

import configparser
from collections.abc import Callable
from dataclasses import dataclass

from .. import validate

DEFAULT_PATH = "/etc/gpusched/frontdoor.conf"


class ConfigError(ValueError):
    pass


def parse_count(text: str) -> int:
    """A whole number, 0 or more (0: off)."""
    if not text.strip().isdigit():
        raise ValueError("expected a whole number (0: off)")
    return int(text)


def parse_listen(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return text


def parse_seconds(text: str) -> float:
    """Seconds, more than 0 (a wait without end is what these settings exist to prevent)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected seconds") from None
    if not value > 0:
        raise ValueError("expected seconds, more than 0")
    return value


def parse_positive(text: str) -> int:
    if parse_count(text) == 0:
        raise ValueError("expected a whole number, 1 or more")
    return int(text)


@dataclass
class Settings:
    # At most this many catalog models running at once (0: no limit but the GPU's memory).
    max_running: int = 0
    # Requests waiting for their model (thaw, start, swap) at once; one more is answered 429.
    queue_size: int = 64
    # How long a request waits for its model to accept it before it is answered 504.
    request_timeout_sec: float = 300.0
    # Freeze a catalog model that served no request for this long (0: never; the daemon's IdleFreezeSec still may).
    idle_freeze_sec: int = 0
    # The longest a model may stay silent while answering (before its first byte, or between two): then 504, or a
    # cut stream. Long for long generations that are not streamed; a bound all the same.
    backend_timeout_sec: float = 600.0
    # A request body larger than this is answered 413 before the router sees it.
    max_body_bytes: int = 16 << 20
    # Without socket activation only (systemd passes the socket otherwise): HOST:PORT to listen on.
    listen: str = "127.0.0.1:8080"

    @classmethod
    def load(cls, path: str = DEFAULT_PATH) -> Settings:
        """A setting absent (or the file) keeps its default; a bad or unknown one is a ConfigError naming it."""
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"), strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read(path)
        except configparser.Error as e:
            raise ConfigError(f"{path}: {e.message}") from None
        section = dict(parser["FrontDoor"]) if parser.has_section("FrontDoor") else {}
        unknown = set(section) - set(SETTINGS)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) in [FrontDoor]: {', '.join(sorted(unknown))}")
        settings = cls()
        for key, (attr, parse) in SETTINGS.items():
            if key in section:
                try:
                    setattr(settings, attr, parse(section[key]))
                except ValueError as e:
                    raise ConfigError(f"{path}: {key}={section[key]}: {e}") from None
        return settings


SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "MaxRunning": ("max_running", parse_count),
    "QueueSize": ("queue_size", parse_positive),
    "RequestTimeoutSec": ("request_timeout_sec", parse_seconds),
    "IdleFreezeSec": ("idle_freeze_sec", parse_count),
    "BackendTimeoutSec": ("backend_timeout_sec", parse_seconds),
    "MaxBodyBytes": ("max_body_bytes", validate.parse_size),
    "Listen": ("listen", parse_listen),
}
