"""The shipped interface XML documents exactly what the daemon serves: same members, same signatures."""

import xml.etree.ElementTree as ET
from pathlib import Path

from gpuschedd.bus.manager import ManagerInterface
from gpuschedd.bus.model_object import ModelInterface
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
            out[f"property {child.get('name')}"] = (child.get("type", ""), child.get("access", ""))
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
