"""One declaration per option and per property, and everything else agrees with it: the XML the project ships,
the daemon's live property methods, docs/dbus-api.md's tables, the SDK's keywords and the CLI's flags."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.service import ServiceInterface
from fake_units import FakeUnits

from gpuschedd import client
from gpuschedd.bus.manager import MANAGER_PROPERTIES, ManagerInterface, parse_options
from gpuschedd.bus.model_object import MODEL_PROPERTIES, ModelInterface
from gpuschedd.bus.service import Exported
from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.cli import build_parser
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.model import Model, State
from gpuschedd.names import MANAGER_IFACE, MODEL_IFACE
from gpuschedd.options import Policies, RunOptions, declared, default_of
from gpuschedd.telemetry import NoGpus

REPO = Path(__file__).resolve().parents[2]
XML = ET.parse(REPO / "dbus" / "org.gpusched1.xml").getroot()
DOC = (REPO / "docs" / "dbus-api.md").read_text()


def xml_members(interface: str) -> dict[str, tuple[str, str]]:
    """(kind, signature) by member name, as docs/dbus-api.md writes them."""
    [iface] = [i for i in XML.findall("interface") if i.get("name") == interface]
    out = {}
    for child in iface:
        if child.tag == "property":
            out[child.get("name", "")] = ("property", child.get("type", ""))
        elif child.tag == "signal":
            out[child.get("name", "")] = ("signal", "".join(a.get("type", "") for a in child.findall("arg")))
        elif child.tag == "method":
            args = child.findall("arg")
            ins = "".join(a.get("type", "") for a in args if a.get("direction", "in") == "in")
            outs = "".join(a.get("type", "") for a in args if a.get("direction") == "out")
            out[child.get("name", "")] = ("method", f"{ins} → {outs}".strip())
    return out


def doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table under `heading` in docs/dbus-api.md, cells without their backquotes."""
    section = DOC.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


def doc_members(heading: str) -> dict[str, tuple[str, str]]:
    return {name: (kind, signature) for kind, name, signature, _what in doc_table(heading)}


@pytest.fixture(scope="module")
def interfaces() -> dict[str, ServiceInterface]:
    engine = Engine(FakeUnits(), NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1))
    return {
        MANAGER_IFACE: ManagerInterface(engine, None),  # type: ignore[arg-type]
        MODEL_IFACE: ModelInterface(engine, None, Model("m", "u", 0, ["x"])),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize(("interface", "table"), [(MANAGER_IFACE, MANAGER_PROPERTIES), (MODEL_IFACE, MODEL_PROPERTIES)])
def test_properties_declared_once_match_the_xml_and_the_service(
    interface: str, table: tuple[Exported, ...], interfaces: dict[str, ServiceInterface]
) -> None:
    declared_props = {row.name: row.signature for row in table}
    assert len(declared_props) == len(table), "a property declared twice"
    shipped = {name: sig for name, (kind, sig) in xml_members(interface).items() if kind == "property"}
    assert declared_props == shipped
    live = {p.name: p.signature for p in ServiceInterface._get_properties(interfaces[interface])}
    assert live == declared_props
    # Every declared getter answers with a value of its signature (Variant checks the value against the type).
    for row in table:
        if row.get is not None:
            Variant(row.signature, row.get(interfaces[interface]))


def test_model_changes_send_only_the_declared_properties_that_moved() -> None:
    """A model's PropertiesChanged carries what moved since the object appeared or was last announced (the
    Manager's mechanism): a freeze of a model without CUDA sends State and its timestamps, not its PIDs."""
    engine = Engine(FakeUnits(), NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1))
    model = Model("m", "u", 0, ["x"], pids=[5], main_pid=5)
    iface = ModelInterface(engine, None, model)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []
    iface.emit_properties_changed = sent.append  # type: ignore[method-assign]
    assert iface.changed() == {} and sent == [], "nothing moved since it appeared"
    model.state, model.state_change_usec = State.FREEZING, 7
    iface.changed()
    assert sent == [{"State": "freezing", "StateChangeTimestamp": 7}]
    model.pids.append(6)  # changed in place
    iface.changed()
    assert sent[-1] == {"Pids": [5, 6]}
    model.state, model.pids, model.main_pid, model.gpus = State.FROZEN, [9], 9, ["GPU-1"]
    model.vram_bytes, model.snapshot_bytes, model.cuda_pids, model.swapped_bytes = 10, 8, [9], 3
    model.spilled_bytes = 2
    model.last_freeze_usec, model.last_thaw_usec, model.state_change_usec = 1, 2, 3
    model.freeze_path, model.parked_bytes = "driver", 4
    assert set(iface.changed()) == {row.name for row in MODEL_PROPERTIES if row.emits}, "each one, when it moves"


@pytest.mark.parametrize(
    ("interface", "table", "heading"),
    [
        (MANAGER_IFACE, MANAGER_PROPERTIES, "### `org.gpusched1.Manager`"),
        (MODEL_IFACE, MODEL_PROPERTIES, "### `org.gpusched1.Model`"),
    ],
)
def test_doc_marks_what_changes_and_what_is_fixed(interface: str, table: tuple[Exported, ...], heading: str) -> None:
    marks = {name: what.split(":")[0] for kind, name, _sig, what in doc_table(heading) if kind == "property"}
    declared = {row.name: "*changes*" if row.emits else "*fixed*" if row.const else "" for row in table}
    assert {name: mark if mark in ("*changes*", "*fixed*") else "" for name, mark in marks.items()} == declared


def test_manager_sends_what_a_model_change_moved(interfaces: dict[str, ServiceInterface]) -> None:
    manager = interfaces[MANAGER_IFACE]
    sent: list[dict[str, Any]] = []
    manager.emit_properties_changed = sent.append  # type: ignore[method-assign]
    manager.changed()  # type: ignore[attr-defined]
    assert set(sent[0]) == {row.name for row in MANAGER_PROPERTIES if row.emits}
    manager.changed()  # type: ignore[attr-defined]
    assert len(sent) == 1  # nothing moved: nothing sent


@pytest.mark.parametrize(
    ("interface", "heading"),
    [(MANAGER_IFACE, "### `org.gpusched1.Manager`"), (MODEL_IFACE, "### `org.gpusched1.Model`")],
)
def test_dbus_api_doc_lists_every_member_with_its_signature(interface: str, heading: str) -> None:
    assert doc_members(heading) == xml_members(interface)


def test_options_doc_sdk_and_cli_follow_the_declarations() -> None:
    rows = {row[0]: row for row in doc_table("### Options of `Run`")}
    specs = declared(RunOptions)
    assert set(rows) == {spec.key for _f, spec in specs}
    policy_fields = {f.name for f, _spec in declared(Policies)}
    cli = build_parser()
    flags = {
        flag for action in cli._subparsers._group_actions[0].choices["run"]._actions for flag in action.option_strings
    }  # type: ignore[union-attr]
    for f, spec in specs:
        key, types, keyword, flag, policy, _what = rows[spec.key]
        assert (types, keyword, policy) == (
            " or ".join(spec.signatures),
            f.name,
            "yes" if f.name in policy_fields else "",
        )
        assert flag == ", ".join(spec.flags) and set(spec.flags) <= flags
        # The XML's Run comment names each key with its type.
        assert re.search(rf"\b{key} \({' or '.join(spec.signatures)}\b", ET.tostring(XML, encoding="unicode")) or (
            f"{key} ({spec.signatures[0]}" in (REPO / "dbus" / "org.gpusched1.xml").read_text()
        ), key


def test_sdk_keywords_round_trip_through_the_bus_parser() -> None:
    """What the SDK sends for each keyword is what the daemon parses into the same field."""
    given = {
        "description": "d",
        "working_directory": "/srv",
        "environment": ["A=1"],
        "gpus": ["0"],
        "user": "nobody",
        "port": 8000,
        "backend_port": 8001,
        "listen_address": "::1",
        "priority": -1,
        "idle_freeze_sec": 0,
        "frozen_ttl_sec": 60,
        "gpu_memory": 1 << 30,
        "agent": True,
        "keep_context": True,
        "inject_agent": True,
    }
    assert set(given) == {f.name for f, _spec in declared(RunOptions)}
    parsed = parse_options(client._options(given))
    assert {name: getattr(parsed, name) for name in given} == {**given, "listen_address": "[::1]"}
    # Left at their defaults, none is sent: the daemon's defaults apply.
    assert client._options({f.name: default_of(f) for f, _spec in declared(RunOptions)}) == {}
    assert set(client._options({"priority": 3}, Policies)) == {"Priority"}
    with pytest.raises(TypeError):
        client._options({"description": "d"}, Policies)  # Adopt takes the policies only


def test_shell_completion_offers_every_declared_flag() -> None:
    """completion/gpusched lists the flags by hand (bash cannot ask argparse): each declared flag is there, run's
    on run's line, the policies' on adopt's too."""
    lines = (REPO / "completion" / "gpusched").read_text().splitlines()
    offered = [set(line.split('"')[1].split()) for line in lines if line.strip().startswith("options+=")]
    run_line = next(flags for flags in offered if "--name" in flags)
    adopt_line = next(flags for flags in offered if "--unit" in flags)
    assert {flag for _f, spec in declared(RunOptions) for flag in spec.flags} <= run_line
    assert {flag for _f, spec in declared(Policies) for flag in spec.flags} <= adopt_line


def test_cli_flags_become_the_sdk_keywords() -> None:
    from gpuschedd.cli import option_args

    argv = ["run", "--name", "m", "--priority", "3", "--gpus", "0,1", "-E", "A=1", "-E", "B=2", "--gpu-memory", "8G"]
    args = build_parser().parse_args([*argv, "--agent", "--idle-freeze-sec", "0", "--", "serve"])
    assert option_args(args, RunOptions) == {
        "priority": 3,
        "idle_freeze_sec": 0,
        "environment": ["A=1", "B=2"],
        "gpus": ["0", "1"],
        "gpu_memory": 8 << 30,
        "agent": True,
    }
    adopt = build_parser().parse_args(["adopt", "m", "--unit", "x.service", "--frozen-ttl-sec", "60"])
    assert option_args(adopt, Policies) == {"frozen_ttl_sec": 60}
