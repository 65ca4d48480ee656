"""The CLI's and SDK's pieces that need no daemon: formatting, progress, journal parsing, signal decoding, error
mapping, and the hand-written man pages (tests/system/test_cli.py and test_sdk.py run them against the daemon)."""

from __future__ import annotations

import asyncio
import grp
import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dbus_fast import Message, MessageType, Variant

from gpuschedd import cli, eventlog, formatting
from gpuschedd.client_errors import DaemonNotRunning, error_of
from gpuschedd.client_events import event_of
from gpuschedd.errors import InsufficientGpuMemory
from gpuschedd.events import MESSAGE_IDS
from gpuschedd.formatting import colors, to_json

REPO = Path(__file__).resolve().parents[2]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_human_ago_like_systemd() -> None:
    assert [formatting.human_ago(s) for s in (0, 42, 303, 7620, 2 * 86400 + 3 * 3600 + 5)] == [
        "0s ago",
        "42s ago",
        "5min 3s ago",
        "2h 7min ago",
        "2 days 3h ago",
    ]


def test_progress_shows_bytes_moved_and_elapsed_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formatting, "PROGRESS_DELAY", 0.01)
    monkeypatch.setattr(formatting, "PROGRESS_INTERVAL", 0.01)
    rss = {1: 100 << 20, 2: 0}
    tty = Tty()
    with formatting.Progress("Freezing llama", 1 << 30, [1, 2], stream=tty, rss=rss.__getitem__):
        rss[2] = 512 << 20  # the checkpoint lands in the process's own memory
        time.sleep(0.1)
    out = tty.getvalue()
    # each line overwrites the last: carriage return, clear to the end of the line, the text
    assert re.search(r"\r\x1b\[KFreezing llama: 512\.0 MiB of 1\.0 GiB, \d\.\d s", out), repr(out)
    assert out.endswith("\r\x1b[K"), "the line is cleared at the end"
    piped = io.StringIO()
    with formatting.Progress("Thawing llama", 1 << 30, stream=piped):
        time.sleep(0.05)
    assert piped.getvalue() == ""


def test_quick_operations_show_no_progress() -> None:
    tty = Tty()
    with formatting.Progress("Freezing x", 1, stream=tty):
        pass
    assert tty.getvalue() == ""


def test_journal_entries_parse() -> None:
    entry = {
        "__REALTIME_TIMESTAMP": "1700000000123456",
        "MESSAGE": "model llama frozen in 0.860s",
        "PRIORITY": "5",
        "GPUSCHED_EVENT": "freeze",
        "GPUSCHED_MODEL": "llama",
        "OBJECT_SYSTEMD_UNIT": "gpusched-model@llama.service",
        "GPUSCHED_DURATION_USEC": "860000",
        "GPUSCHED_BYTES": "1700000000",
        "GPUSCHED_GPUS": "GPU-a GPU-b",
        "GPUSCHED_ERROR": ["org.x", "twice"],
        "MESSAGE_ID": MESSAGE_IDS[next(iter(MESSAGE_IDS))],
    }
    event = eventlog.parse_entry(entry)
    assert (event.event, event.model, event.duration_usec, event.bytes) == ("freeze", "llama", 860000, 1700000000)
    assert event.gpus == ["GPU-a", "GPU-b"] and event.fields == {"GPUSCHED_ERROR": "org.x"}
    assert event.to_json()["time"].startswith("2023-11-")
    binary = eventlog.parse_entry({"MESSAGE": list(b"caf\xc3\xa9 \xff")})
    assert binary.message == "café \ufffd"
    line = formatting.event_line(event, 8, color=False)
    assert line.endswith(" freeze   llama    model llama frozen in 0.860s")


def test_journalctl_matches_every_id_from_root_only() -> None:
    argv = eventlog.journalctl_argv(model="llama", since="today", lines=5, follow=True)
    assert argv[:2] == ["journalctl", "--no-pager"]
    assert {a.removeprefix("MESSAGE_ID=") for a in argv if a.startswith("MESSAGE_ID=")} == set(MESSAGE_IDS.values())
    assert {"_UID=0", "GPUSCHED_MODEL=llama", "--since=today", "--lines=5", "--follow"} <= set(argv)


def signal(path: str, interface: str, member: str, signature: str, body: list[object]) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body,
    )


def test_signals_become_model_events() -> None:
    props = {"State": Variant("s", "frozen"), "Pids": Variant("au", [1])}
    changed = signal(
        "/org/gpusched1/model/llama_2d7b",
        "org.freedesktop.DBus.Properties",
        "PropertiesChanged",
        "sa{sv}as",
        ["org.gpusched1.Model", props, []],
    )
    event = event_of(changed)
    assert event is not None and (event.kind, event.name, event.state) == ("changed", "llama-7b", "frozen")
    added = signal("/org/gpusched1", "org.gpusched1.Manager", "ModelNew", "so", ["x", "/org/gpusched1/model/x"])
    new = event_of(added)
    assert new is not None and (new.kind, new.name) == ("new", "x")


def test_errors_map_to_typed_exceptions() -> None:
    def reply(name: str) -> Message:
        return Message(message_type=MessageType.ERROR, error_name=name, reply_serial=1, signature="s", body=["text"])

    assert isinstance(error_of(reply("org.gpusched1.Error.InsufficientGpuMemory")), InsufficientGpuMemory)
    assert isinstance(error_of(reply("org.freedesktop.DBus.Error.ServiceUnknown")), DaemonNotRunning)
    other = error_of(reply("org.example.Odd"))
    assert other.dbus_name == "org.example.Odd" and other.message == "text"


def test_man_page_knows_every_command() -> None:
    text = (REPO / "man" / "gpusched.1").read_text()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in sub.choices:  # type: ignore[union-attr]
        assert re.search(rf"^\.B[IR]? {command}\b", text, re.M), f"{command} is not in gpusched.1"


def test_run_options_reach_the_bus_with_their_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `gpusched run` (and adopt) flag becomes the option of DESIGN.md's type; defaults are left to the daemon."""
    from gpuschedd.client import AsyncGpuSched

    sent: list[dict[str, object]] = []
    methods: list[str] = []

    async def fake_call(self: AsyncGpuSched, member: str, signature: str = "", body: list | None = None, **kw: object):  # type: ignore[no-untyped-def]
        if member in ("Run", "Adopt", "AdoptProcesses"):
            methods.append(member)
            sent.append({k: (v.signature, v.value) for k, v in body[2].items()})  # type: ignore[index]
            return ["/org/gpusched1/model/m"]
        return [{"Unit": Variant("s", "gpusched-model@m.service"), "Pids": Variant("au", [])}]

    monkeypatch.setattr(AsyncGpuSched, "_call", fake_call)
    monkeypatch.setattr(AsyncGpuSched, "connect", lambda self: asyncio.sleep(0, self))
    argv = ["run", "--name", "m", "--port", "8080", "--backend-port", "8081", "--priority", "-2"]
    argv += ["--idle-freeze-sec", "0", "--frozen-ttl-sec", "600", "--gpu-memory", "1.5G", "--workdir", "/srv", "--"]
    assert cli.main([*argv, "serve"]) == 0
    assert sent[-1] == {
        "GpuMemory": ("t", 3 << 29),
        "WorkingDirectory": ("s", "/srv"),
        "Port": ("q", 8080),
        "BackendPort": ("q", 8081),
        "Priority": ("i", -2),
        "IdleFreezeSec": ("t", 0),
        "FrozenTTLSec": ("t", 600),
    }
    assert cli.main(["run", "--name", "m", "--workdir", "/srv", "--", "serve"]) == 0
    assert sent[-1] == {"WorkingDirectory": ("s", "/srv")}
    with pytest.raises(SystemExit) as usage:
        cli.main(["run", "--name", "m", "--gpu-memory", "lots", "--", "serve"])
    assert usage.value.code == 2 and len(sent) == 2
    # adopt takes the same policy flags, for a unit and for processes
    policies = ["--priority", "3", "--idle-freeze-sec", "60", "--frozen-ttl-sec", "0"]
    assert cli.main(["adopt", "m", "--unit", "vllm.service", *policies]) == 0
    assert (methods[-1], sent[-1]) == ("Adopt", {"Priority": ("i", 3), "IdleFreezeSec": ("t", 60)})
    assert cli.main(["adopt", "m", "--pid", "42", "--frozen-ttl-sec", "5"]) == 0
    assert (methods[-1], sent[-1]) == ("AdoptProcesses", {"FrozenTTLSec": ("t", 5)})


def test_status_shows_a_models_policies() -> None:
    model = {
        "Name": "m", "State": "running", "Unit": "gpusched-model@m.service", "Owner": 0, "Command": ["serve"],
        "StateChangeTimestamp": 0, "MainPid": 7, "Pids": [7], "Gpus": [], "SnapshotBytes": 0, "VramBytes": 0,
        "LastFreezeUSec": 0, "LastThawUSec": 0, "Priority": -1, "IdleFreezeSec": 300, "FrozenTTLSec": 0,
    }  # fmt: skip
    lines = formatting.model_lines(model, [], False, time.time())
    assert "    Policies: priority -1, idle freeze after 300s, stop when frozen never" in lines
    del model["Priority"], model["IdleFreezeSec"], model["FrozenTTLSec"]  # a daemon older than the CLI
    assert not any("Policies" in line for line in formatting.model_lines(model, [], False, time.time()))


@pytest.mark.parametrize(
    ("argv", "style"),
    [
        (["list"], None),
        (["--json", "list"], "short"),
        (["list", "--json"], "short"),
        (["--json=short", "list"], "short"),
        (["--json=pretty", "list"], "pretty"),
        (["status", "--json=pretty", "m"], "pretty"),
    ],
)
def test_json_styles_before_or_after_the_command(argv: list[str], style: str | None) -> None:
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, "json", None) == style and args.command in ("list", "status")
    assert cli.build_parser().parse_args([*argv, "--no-pager"]).no_pager is True


def test_to_json_short_is_one_line_pretty_is_indented() -> None:
    value = {"a": [1, 2], "b": {"c": "d"}}
    assert "\n" not in to_json(value, "short") and json.loads(to_json(value, "short")) == value
    assert json.loads(to_json(value, "pretty")) == value and "\n  " in to_json(value, "pretty")


@pytest.mark.parametrize(
    ("value", "tty", "expected"),
    [("0", True, False), ("false", True, False), ("1", False, True), ("256", False, True), ("", True, True)],
)
def test_systemd_colors_is_honoured(monkeypatch: pytest.MonkeyPatch, value: str, tty: bool, expected: bool) -> None:
    monkeypatch.setenv("SYSTEMD_COLORS", value)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    assert colors(stream) is expected


def test_help_shows_the_program_or_one_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help"]) == 0
    assert "usage: gpusched" in capsys.readouterr().out
    assert cli.main(["help", "freeze"]) == 0
    assert capsys.readouterr().out.startswith("usage: gpusched freeze")
    with pytest.raises(SystemExit) as info:
        cli.main(["help", "nosuch"])
    assert info.value.code == cli.EXIT_USAGE


def test_refused_outside_the_group_says_how_to_join(monkeypatch: pytest.MonkeyPatch) -> None:
    member = grp.struct_group(("gpusched", "x", 4242, ["alice"]))
    monkeypatch.setattr(cli.grp, "getgrnam", lambda name: member)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli.os, "getgroups", lambda: [1000])
    for user, wanted in (("bob", "usermod -aG gpusched bob, then log in again"), ("alice", "log in again")):
        monkeypatch.setattr(cli.pwd, "getpwuid", lambda uid, user=user: SimpleNamespace(pw_name=user))
        assert wanted in cli.access_hint()
    monkeypatch.setattr(cli.os, "getgroups", lambda: [1000, 4242])
    assert cli.access_hint() == ""


def test_setenv_name_alone_copies_the_callers_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd-run's -E NAME: the caller's value, or empty where the caller has none."""
    monkeypatch.setenv("GS_COPIED", "from the shell")
    monkeypatch.delenv("GS_UNSET", raising=False)
    assert cli.copied_environment(["A=1", "GS_COPIED", "GS_UNSET", "B=x=y"]) == [
        "A=1",
        "GS_COPIED=from the shell",
        "GS_UNSET=",
        "B=x=y",
    ]
