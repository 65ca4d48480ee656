"""The shipped interface XML documents exactly what the daemon serves: same members, same signatures, same
EmitsChangedSignal annotations (what a client may cache)."""

import xml.etree.ElementTree as ET
from pathlib import Path

from gpuschedd.bus.manager import ManagerInterface
from gpuschedd.bus.model_object import ModelInterface
from gpuschedd.bus.service import EMITS_CHANGED_SIGNAL
from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.model import Model
from gpuschedd.telemetry import NoGpus

XML = Path(__file__).resolve().parents[2] / "dbus" / "org.gpusched1.xml"


def members(iface: ET.Element) -> dict[str, tuple[str, ...]]:
    out = {}
    for child in iface:
        if child.tag == "property":
            emits = [a.get("value", "") for a in child.findall("annotation") if a.get("name") == EMITS_CHANGED_SIGNAL]
            out[f"property {child.get('name')}"] = (child.get("type", ""), child.get("access", ""), *emits)
        elif child.tag in ("method", "signal"):
            args = tuple(f"{a.get('direction', 'out')}:{a.get('type')}" for a in child.findall("arg"))
            out[f"{child.tag} {child.get('name')}"] = args
    return out


def test_shipped_xml_matches_the_service() -> None:
    shipped = {i.get("name"): members(i) for i in ET.parse(XML).getroot().findall("interface")}
    engine = Engine(None, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1))  # type: ignore[arg-type]
    live = {
        iface.name: members(iface.introspect().to_xml())
        for iface in (ManagerInterface(engine, None), ModelInterface(engine, None, Model("m", "u", 0, ["x"])))  # type: ignore[arg-type]
    }
    assert shipped == live


def test_every_member_is_documented() -> None:
    text = XML.read_text()
    for iface in ET.parse(XML).getroot().findall("interface"):
        for child in iface:
            name = child.get("name")
            assert name and (f"{name}:" in text or f"{name}," in text), f"{name} has no comment"


def test_every_property_says_whether_it_emits() -> None:
    """Without the annotation D-Bus means "true": a property that changes unannounced must say "false"."""
    for iface in ET.parse(XML).getroot().findall("interface"):
        for prop in iface.findall("property"):
            values = [a.get("value") for a in prop.findall("annotation") if a.get("name") == EMITS_CHANGED_SIGNAL]
            assert values in (["true"], ["const"], ["false"]), prop.get("name")
