"""Checks on everything a caller hands us, before anything changes. Every local user can reach the bus, so
each check is strict and answers InvalidArgs with a message that names the field, never our internals."""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidArgs

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", re.IGNORECASE)
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

MAX_ARGV = 4096
MAX_ARG_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 1024 * 1024
MAX_ENV = 1024
MAX_PATH_BYTES = 4096
MAX_DESCRIPTION = 256
MAX_GPUS = 64

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A GPU is named by index ("0") or by NVML UUID ("GPU-xxxxxxxx-…", "MIG-…"): never anything a shell or
# CUDA_VISIBLE_DEVICES could misread.
_GPU_RE = re.compile(r"[0-9]{1,3}|(?:GPU|MIG)-[0-9A-Za-z-]{1,80}")
_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
# Unicode categories that are not text a reader sees as it is: controls (a newline forges a journal line), format
# characters (bidi overrides such as U+202E reorder what follows), line and paragraph separators, surrogates and
# private use.
_UNSAFE = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs", "Co"))


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE


def shown(text: str, limit: int = 256) -> str:
    """Untrusted text (a caller's string, a command line) as it may appear in a journal MESSAGE or an error: at most
    `limit` characters, every control or format character written as an escape (\\n, \\u202e), so it is one
    line that reads as what it is. Every message that carries a caller's text goes through here."""
    short = text[:limit]
    out = "".join(char.encode("unicode_escape").decode("ascii") if _unsafe(char) else char for char in short)
    return out + ("…" if len(text) > limit else "")


def _no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise InvalidArgs(f"{what} contains a NUL byte")


def argv(values: list[str]) -> list[str]:
    if not values:
        raise InvalidArgs("argv must not be empty")
    if len(values) > MAX_ARGV:
        raise InvalidArgs(f"argv has more than {MAX_ARGV} elements")
    total = 0
    for value in values:
        _no_nul(value, "argv")
        size = len(value.encode())
        if size > MAX_ARG_BYTES:
            raise InvalidArgs(f"an argv element is longer than {MAX_ARG_BYTES} bytes")
        total += size
    if total > MAX_TOTAL_BYTES:
        raise InvalidArgs(f"argv is longer than {MAX_TOTAL_BYTES} bytes in all")
    if not values[0]:
        raise InvalidArgs("argv[0] must not be empty")
    return list(values)


def environment(values: list[str]) -> list[str]:
    if len(values) > MAX_ENV:
        raise InvalidArgs(f"more than {MAX_ENV} environment entries")
    for entry in values:
        _no_nul(entry, "Environment")
        name, sep, _ = entry.partition("=")
        if not sep or not _ENV_NAME_RE.fullmatch(name):
            raise InvalidArgs("Environment entries must look like NAME=value with NAME in [A-Za-z_][A-Za-z0-9_]*")
        if len(entry.encode()) > MAX_ARG_BYTES:
            raise InvalidArgs(f"an Environment entry is longer than {MAX_ARG_BYTES} bytes")
    return list(values)


def command_bytes(argv: list[str], environment: list[str]) -> int:
    """The bytes a Run asks to keep (argv and Environment, each entry with its terminating NUL as exec counts them),
    at most MAX_TOTAL_BYTES in all."""
    total = sum(len(value.encode()) + 1 for value in (*argv, *environment))
    if total > MAX_TOTAL_BYTES:
        raise InvalidArgs(f"argv and Environment are longer than {MAX_TOTAL_BYTES} bytes in all")
    return total


def working_directory(value: str) -> str:
    _no_nul(value, "WorkingDirectory")
    if value and (not value.startswith("/") or len(value.encode()) > MAX_PATH_BYTES):
        raise InvalidArgs("WorkingDirectory must be an absolute path")
    return value


def description(value: str) -> str:
    if len(value) > MAX_DESCRIPTION or any(_unsafe(c) for c in value):
        raise InvalidArgs(
            f"Description must be at most {MAX_DESCRIPTION} printable characters (no control or format characters)"
        )
    return value


def gpus(values: list[str]) -> list[str]:
    if len(values) > MAX_GPUS:
        raise InvalidArgs(f"more than {MAX_GPUS} GPUs")
    for gpu in values:
        if not _GPU_RE.fullmatch(gpu):
            raise InvalidArgs("GPUs are named by index (0, 1, …) or UUID (GPU-…, MIG-…)")
    return list(values)


def user(value: str) -> str:
    if value and not _USER_RE.fullmatch(value):
        raise InvalidArgs("User must be a valid user name")
    return value


def parse_size(text: str) -> int:
    """systemd's size syntax: 512M, 64G, 1.5T, plain bytes (K, M, G, T are powers of 1024). ValueError if not a
    size. Here, not in config.py, because the CLI reads sizes too and must not import the daemon's modules."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _SCALE[m.group(2).upper()])
