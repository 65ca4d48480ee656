"""Every fixed name of the product, and the rules that turn a model name into unit names and object paths."""

from __future__ import annotations

import re

from .errors import InvalidArgs

BUS_NAME = "org.gpusched1"
MANAGER_PATH = "/org/gpusched1"
MANAGER_IFACE = "org.gpusched1.Manager"
MODEL_IFACE = "org.gpusched1.Model"
MODEL_PATH_PREFIX = "/org/gpusched1/model/"

SLICE = "gpusched.slice"
MODEL_UNIT_PREFIX = "gpusched-model@"
MODEL_UNIT_SUFFIX = ".service"

# Letters, digits and "._-", starting with a letter or digit: safe inside a unit instance name
# (no escaping needed, so `systemctl status gpusched-model@NAME` is what the user typed), inside a
# file name, and never "..". 64 characters leaves room under systemd's 256-byte unit name limit.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.fullmatch(name)) and ".." not in name


def validate_model_name(name: object) -> str:
    if not isinstance(name, str) or not is_model_name(name):
        raise InvalidArgs(
            "invalid model name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def model_unit(name: str) -> str:
    return f"{MODEL_UNIT_PREFIX}{name}{MODEL_UNIT_SUFFIX}"


def model_name_from_unit(unit: str) -> str | None:
    """The model name of a `gpusched-model@NAME.service` unit, or None for any other unit."""
    if unit.startswith(MODEL_UNIT_PREFIX) and unit.endswith(MODEL_UNIT_SUFFIX):
        name = unit[len(MODEL_UNIT_PREFIX) : -len(MODEL_UNIT_SUFFIX)]
        if is_model_name(name):
            return name
    return None


def bus_label_escape(label: str) -> str:
    """Escape one object path element exactly like systemd's bus_label_escape(): every byte outside
    [A-Za-z0-9] (and a leading digit) becomes _xx in lower-case hex; the empty string becomes "_"."""
    if not label:
        return "_"
    out = []
    for i, byte in enumerate(label.encode()):
        char = chr(byte)
        if (char.isascii() and char.isalpha()) or (i > 0 and char.isdigit()):
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def model_path(name: str) -> str:
    return MODEL_PATH_PREFIX + bus_label_escape(name)


def bus_label_unescape(label: str) -> str:
    """Inverse of systemd's bus_label_escape (bus_label_escape above)."""
    out = bytearray()
    i = 0
    while i < len(label):
        hexpair = label[i + 1 : i + 3]
        if label[i] == "_" and len(hexpair) == 2 and all(c in "0123456789abcdef" for c in hexpair):
            out.append(int(hexpair, 16))
            i += 3
        else:
            out += label[i].encode()
            i += 1
    return out.decode(errors="replace")


def model_name_from_path(path: str) -> str | None:
    """The model name of an object path under /org/gpusched1/model/, or None for any other path."""
    if not path.startswith(MODEL_PATH_PREFIX) or "/" in path[len(MODEL_PATH_PREFIX) :]:
        return None
    return bus_label_unescape(path[len(MODEL_PATH_PREFIX) :])
