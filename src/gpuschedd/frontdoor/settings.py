"""The front door's settings from /etc/gpusched/frontdoor.conf and its drop-ins frontdoor.conf.d/*.conf
(systemd-style INI, section [FrontDoor]), read as the daemon reads its own (settings_file.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import validate
from ..settings_file import ConfigError, Table, apply, parse_count, parse_listen, read_section

__all__ = ["DEFAULT_PATH", "ConfigError", "Settings"]

DEFAULT_PATH = "/etc/gpusched/frontdoor.conf"


def parse_seconds(text: str) -> float:
    """Seconds, more than 0 (a wait without end is what these settings exist to prevent)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected seconds") from None
    if not value > 0:
        raise ValueError("expected seconds, more than 0")
    return value


def parse_address(text: str) -> str:
    """Listen=: HOST:PORT, not empty (the front door always listens somewhere)."""
    if not text:
        raise ValueError("expected HOST:PORT")
    return parse_listen(text)


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
        section, where = read_section(path, "FrontDoor")
        settings = cls()
        apply(settings, SETTINGS, section, where, "FrontDoor")
        return settings


SETTINGS: Table = {
    "MaxRunning": ("max_running", parse_count),
    "QueueSize": ("queue_size", parse_positive),
    "RequestTimeoutSec": ("request_timeout_sec", parse_seconds),
    "IdleFreezeSec": ("idle_freeze_sec", parse_count),
    "BackendTimeoutSec": ("backend_timeout_sec", parse_seconds),
    "MaxBodyBytes": ("max_body_bytes", validate.parse_size),
    "Listen": ("listen", parse_address),
}
