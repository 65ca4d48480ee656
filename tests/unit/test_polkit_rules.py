"""Who may do what, without a bus: the bus layer's choice of polkit action and details, ownership, and the
engine's refusal to give a non-root caller a root process. tests/system/test_security.py checks the same against
the real polkitd with the shipped policy and rules."""

from __future__ import annotations

import asyncio
import contextlib
import pwd
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag, Variant
from dbus_fast.errors import DBusError
from engine_kit import Recorder

from gpuschedd.bus import polkit
from gpuschedd.bus.connection import current_message
from gpuschedd.bus.manager import ManagerInterface, parse_options
from gpuschedd.bus.model_object import ModelInterface
from gpuschedd.engine import Engine
from gpuschedd.errors import AccessDenied, GpuschedError, InvalidArgs
from gpuschedd.events import EventKind
from gpuschedd.journal import journal_fields
from gpuschedd.model import State
from gpuschedd.options import Policies, RunOptions

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "polkit" / "org.gpusched1.policy"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
NOBODY = pwd.getpwnam("nobody")


class FakeAuthority(polkit.Authority):
    """polkit as a table: uid per sender, and the (uid, action) pairs that are allowed. Records every question."""

    def __init__(self, uids: dict[str, int], allowed: set[tuple[int, str]]) -> None:
        self._senders = uids
        self.allowed = allowed
        self.asked: list[tuple[int, str, dict[str, str]]] = []
        self.delay = 0.0

    async def caller_uid(self, msg: Message) -> int:
        return self._senders[msg.sender or ""]

    def known_uid(self, sender: str) -> int | None:
        return self._senders.get(sender)

    async def check(self, msg: Message, action: str, details: dict[str, str]) -> int:
        uid = await self.caller_uid(msg)
        self.asked.append((uid, action, dict(details)))
        await asyncio.sleep(self.delay)
        if uid == 0 or (uid, action) in self.allowed:
            return uid
        raise AccessDenied(f"not authorized for {action}")


@pytest.fixture
def authority() -> FakeAuthority:
    return FakeAuthority({":1.1": 0, ":1.2": NOBODY.pw_uid, ":1.3": 4242}, set())


@pytest.fixture
def manager(engine: Engine, authority: FakeAuthority) -> ManagerInterface:
    return ManagerInterface(engine, authority)


@contextlib.contextmanager
def as_(sender: str) -> Iterator[None]:
    """Calls made inside come from `sender`, as the bus dispatch would tell them."""
    token = current_message.set(Message(sender=sender, path="/org/gpusched1", member="X"))
    try:
        yield
    finally:
        current_message.reset(token)


def call(iface: Any, member: str, *args: Any) -> Any:
    """The coroutine behind a D-Bus method (dbus-fast's @method wrapper drops what it returns)."""
    return getattr(type(iface), member).__wrapped__(iface, *args)


async def error_of(coro: Any) -> str:
    with pytest.raises(DBusError) as info:
        await coro
    assert "Traceback" not in info.value.text and ".py" not in info.value.text
    return info.value.type


# ----------------------------------------------------------------- actions, details, ownership


async def test_run_asks_run_with_details_and_runs_as_the_caller(
    manager: ManagerInterface, engine: Engine, authority: FakeAuthority
) -> None:
    authority.allowed.add((NOBODY.pw_uid, polkit.ACTION_RUN))
    with as_(":1.2"):
        await call(manager, "Run", "llama", ["/bin/true"], {})
    assert authority.asked == [
        (NOBODY.pw_uid, polkit.ACTION_RUN, {"verb": "run", "model": "llama", "unit": "gpusched-model@llama.service"})
    ]
    model = engine.get("llama")
    assert model.owner == NOBODY.pw_uid
    assert engine.units.specs[model.unit].user == "nobody"  # type: ignore[attr-defined]


async def test_user_option_needs_manage(manager: ManagerInterface, engine: Engine, authority: FakeAuthority) -> None:
    authority.allowed.add((NOBODY.pw_uid, polkit.ACTION_RUN))
    with as_(":1.2"):
        assert await error_of(call(manager, "Run", "x", ["/bin/true"], {"User": Variant("s", "root")})) == ACCESS_DENIED
    assert authority.asked[-1][1:] == (
        polkit.ACTION_MANAGE,
        {"verb": "run", "model": "x", "unit": "gpusched-model@x.service", "user": "root"},
    )
    assert "x" not in engine.models


async def test_control_of_own_model_is_control_and_of_others_control_any(
    manager: ManagerInterface, engine: Engine, authority: FakeAuthority
) -> None:
    with as_(":1.1"):
        await call(manager, "Run", "roots", ["/bin/true"], {})
    authority.allowed |= {(NOBODY.pw_uid, polkit.ACTION_RUN), (NOBODY.pw_uid, polkit.ACTION_CONTROL)}
    with as_(":1.2"):
        await call(manager, "Run", "mine", ["/bin/true"], {})
        await call(manager, "Freeze", "mine")
        assert authority.asked[-1] == (
            NOBODY.pw_uid,
            polkit.ACTION_CONTROL,
            {"verb": "freeze", "model": "mine", "unit": "gpusched-model@mine.service", "owner": str(NOBODY.pw_uid)},
        )
        for attempt in (
            call(manager, "Freeze", "roots"),
            call(manager, "Stop", "roots"),
            call(manager, "Forget", "roots"),
        ):
            assert await error_of(attempt) == ACCESS_DENIED
            assert authority.asked[-1][1] == polkit.ACTION_CONTROL_ANY and authority.asked[-1][2]["owner"] == "0"
    assert engine.get("roots").state == State.RUNNING and engine.get("mine").state == State.FROZEN


async def test_swap_needs_both_models(manager: ManagerInterface, engine: Engine, authority: FakeAuthority) -> None:
    with as_(":1.1"):
        await call(manager, "Run", "roots", ["/bin/true"], {})
        await call(manager, "Freeze", "roots")
    authority.allowed |= {(NOBODY.pw_uid, polkit.ACTION_RUN), (NOBODY.pw_uid, polkit.ACTION_CONTROL)}
    with as_(":1.2"):
        await call(manager, "Run", "mine", ["/bin/true"], {})
        # freezing my model and thawing root's: the second half is somebody else's
        assert await error_of(call(manager, "Swap", "mine", "roots")) == ACCESS_DENIED
        assert [a[1] for a in authority.asked[-2:]] == [polkit.ACTION_CONTROL, polkit.ACTION_CONTROL_ANY]
    assert engine.get("mine").state == State.RUNNING and engine.get("roots").state == State.FROZEN


async def test_model_object_methods_are_checked_too(engine: Engine, authority: FakeAuthority) -> None:
    await engine.run("roots", ["/bin/true"], RunOptions(), 0)
    iface = ModelInterface(engine, authority, engine.get("roots"))
    with as_(":1.2"):
        for attempt in (call(iface, "Freeze"), call(iface, "Thaw"), call(iface, "Stop")):
            assert await error_of(attempt) == ACCESS_DENIED
    assert [a[1] for a in authority.asked] == [polkit.ACTION_CONTROL_ANY] * 3
    assert [a[2]["verb"] for a in authority.asked] == ["freeze", "thaw", "stop"]


async def test_unimplemented_and_unlisted_members_fail_closed(
    manager: ManagerInterface, authority: FakeAuthority
) -> None:
    with as_(":1.3"):
        assert await error_of(call(manager, "Adopt", "a", "foo.service", {})) == ACCESS_DENIED
        assert await error_of(call(manager, "AdoptProcesses", "a", [1], {})) == ACCESS_DENIED
    assert [a[1] for a in authority.asked] == [polkit.ACTION_ADOPT] * 2
    assert authority.asked[0][2]["unit"] == "foo.service"


async def test_a_model_replaced_while_polkit_thinks_is_not_touched(
    manager: ManagerInterface, engine: Engine, authority: FakeAuthority
) -> None:
    """polkit answers asynchronously; an authorization for the model named X must not act on a new X."""
    authority.allowed |= {(NOBODY.pw_uid, polkit.ACTION_RUN), (NOBODY.pw_uid, polkit.ACTION_CONTROL)}
    with as_(":1.2"):
        await call(manager, "Run", "x", ["/bin/true"], {})
    authority.delay = 0.2
    with as_(":1.2"):
        freeze = asyncio.ensure_future(call(manager, "Freeze", "x"))
    await asyncio.sleep(0.05)  # nobody's freeze is waiting for polkit: root replaces x meanwhile
    await engine.stop("x")
    await engine.forget("x")
    await engine.run("x", ["/bin/true"], RunOptions(), 0)
    assert await error_of(freeze) == "org.gpusched1.Error.NoSuchModel"
    assert engine.get("x").state == State.RUNNING and engine.get("x").owner == 0


async def test_a_catalog_model_is_started_frozen_and_thawed_with_control_catalog_and_nothing_more(
    engine: Engine, authority: FakeAuthority, tmp_path: Path
) -> None:
    """Root's catalog model: another user with control-catalog may Start, Freeze, Thaw, Swap and PageOut it, never
    Stop, Forget or Migrate it (control-any); its own User= asks control; Start of a model someone ran is NoSuchModel
    before polkit is asked; Reload is manage."""
    for name in ("cat", "cat2"):
        (tmp_path / f"{name}.conf").write_text("[Model]\nCommand=/bin/true\nUser=root\n")
    engine.catalog_dirs, engine.catalog_owner = (str(tmp_path),), pwd.getpwuid(tmp_path.stat().st_uid).pw_uid
    await engine.reload_catalog()
    await engine.run("roots", ["/bin/true"], RunOptions(), 0)
    manager = ManagerInterface(engine, authority)
    authority.allowed.add((NOBODY.pw_uid, polkit.ACTION_CONTROL_CATALOG))
    with as_(":1.2"):
        assert await call(manager, "Start", "cat") == "/org/gpusched1/model/cat"
        await call(manager, "Start", "cat2")
        await call(manager, "Freeze", "cat")
        await call(manager, "Thaw", "cat")
        await call(manager, "Swap", "cat2", "cat")
        engine._swap_space = lambda: (0, 0)  # type: ignore[method-assign]  # no swap: authorized, then refused
        assert await error_of(call(manager, "PageOut", "cat2")) == "org.gpusched1.Error.NotSupported"
        for attempt in (call(manager, "Stop", "cat"), call(manager, "Forget", "cat"), call(manager, "Reload")):
            assert await error_of(attempt) == ACCESS_DENIED
        asked = len(authority.asked)
        assert await error_of(call(manager, "Start", "roots")) == "org.gpusched1.Error.NoSuchModel"
        assert len(authority.asked) == asked
        assert await error_of(call(manager, "Freeze", "roots")) == ACCESS_DENIED
    assert [(a[1], a[2]["verb"]) for a in authority.asked] == [
        (polkit.ACTION_CONTROL_CATALOG, "start"),
        (polkit.ACTION_CONTROL_CATALOG, "start"),
        (polkit.ACTION_CONTROL_CATALOG, "freeze"),
        (polkit.ACTION_CONTROL_CATALOG, "thaw"),
        (polkit.ACTION_CONTROL_CATALOG, "swap"),
        (polkit.ACTION_CONTROL_CATALOG, "swap"),
        (polkit.ACTION_CONTROL_CATALOG, "pageout"),
        (polkit.ACTION_CONTROL_ANY, "stop"),
        (polkit.ACTION_CONTROL_ANY, "forget"),
        (polkit.ACTION_MANAGE, "reload"),
        (polkit.ACTION_CONTROL_ANY, "freeze"),
    ]
    assert engine.get("cat").state == State.RUNNING and engine.get("cat2").state == State.FROZEN
    assert engine.get("cat").owner == 0
    assert engine.units.specs["gpusched-model@cat.service"].user == "root"  # type: ignore[attr-defined]
    # its own user asks control
    (tmp_path / "own.conf").write_text("[Model]\nCommand=/bin/true\nUser=nobody\n")
    await engine.reload_catalog()
    authority.allowed.add((NOBODY.pw_uid, polkit.ACTION_CONTROL))
    iface = ModelInterface(engine, authority, engine.get("own"))
    with as_(":1.2"):
        await call(iface, "Start")
    assert authority.asked[-1][1:] == (
        polkit.ACTION_CONTROL,
        {"verb": "start", "model": "own", "unit": "gpusched-model@own.service", "owner": str(NOBODY.pw_uid)},
    )
    assert engine.units.specs["gpusched-model@own.service"].user == "nobody"  # type: ignore[attr-defined]


# ----------------------------------------------------------------- the engine's own line


async def test_engine_never_gives_a_non_root_caller_a_root_process(engine: Engine) -> None:
    for user in ("root", *(p.pw_name for p in pwd.getpwall() if p.pw_uid == 0)):
        with pytest.raises(AccessDenied):
            await engine.run("r", ["/bin/true"], RunOptions(user=user), NOBODY.pw_uid)
    with pytest.raises(AccessDenied):
        await engine.run("r", ["/bin/true"], RunOptions(), -1)
    with pytest.raises(InvalidArgs):  # a uid without a user name cannot be run as
        await engine.run("r", ["/bin/true"], RunOptions(), 4242)
    assert "r" not in engine.models
    model = await engine.run("r", ["/bin/true"], RunOptions(), NOBODY.pw_uid)
    assert engine.units.specs[model.unit].user == "nobody"  # type: ignore[attr-defined]


# ----------------------------------------------------------------- options


def test_run_options_types_and_keys() -> None:
    opts = parse_options(
        {
            "Description": Variant("s", "d"),
            "WorkingDirectory": Variant("s", "/srv"),
            "Environment": Variant("as", ["A=1"]),
            "Gpus": Variant("as", ["0", "GPU-1234abcd"]),
            "User": Variant("s", "nobody"),
            "GpuMemory": Variant("t", 8 << 30),
        }
    )
    assert opts.gpu_memory == 8 << 30
    assert (opts.description, opts.working_directory, opts.environment, opts.gpus, opts.user) == (
        "d",
        "/srv",
        ["A=1"],
        ["0", "GPU-1234abcd"],
        "nobody",
    )
    bad = [
        {"Gpus": Variant("s", "0")},
        {"Environment": Variant("s", "A=1")},
        {"Description": Variant("u", 1)},
        {"User": Variant("u", 0)},
        {"Nope": Variant("s", "")},
        {"x" * 100000: Variant("s", "")},
        {"\0evil\n": Variant("s", "")},
        {"Environment": Variant("as", ["LD_PRELOAD"])},
        {"Environment": Variant("as", ["A=\0"])},
        {"WorkingDirectory": Variant("s", "relative")},
        {"Gpus": Variant("as", ["0,1"])},
        {"Gpus": Variant("as", ["../0"])},
        {"User": Variant("s", "root;id")},
        {"GpuMemory": Variant("s", "8G")},
        {"GpuMemory": Variant("i", 1)},
        {"KeepContext": Variant("s", "yes")},
    ]
    for options in bad:
        with pytest.raises(InvalidArgs) as info:
            parse_options(options)
        # short whatever the caller sent (an unknown key is cut; the list of known keys is fixed)
        assert len(info.value.message) < 256 and "typing" not in info.value.message and "\0" not in info.value.message


def test_adopt_takes_the_policy_options_of_run_and_no_others() -> None:
    policies = {"Priority": Variant("i", -2), "IdleFreezeSec": Variant("u", 300), "FrozenTTLSec": Variant("t", 60)}
    for cls in (Policies, RunOptions):
        opts = parse_options(policies, cls)
        assert (opts.priority, opts.idle_freeze_sec, opts.frozen_ttl_sec) == (-2, 300, 60)
    assert parse_options({}, Policies).idle_freeze_sec == -1  # absent: the daemon's IdleFreezeSec=
    bad = [
        {"Description": Variant("s", "d")},  # about starting a unit: Run's alone
        {"Port": Variant("q", 8000), "BackendPort": Variant("q", 8001)},
        {"Priority": Variant("s", "high")},
        {"IdleFreezeSec": Variant("i", 5)},
        {"FrozenTTLSec": Variant("t", 10**9)},
        {"GpuMemory": Variant("t", 1 << 30)},  # adopted processes hold their memory already
    ]
    for options in bad:
        with pytest.raises(InvalidArgs) as info:
            parse_options(options, Policies)
        assert "Priority" in info.value.message or "FrozenTTLSec" in info.value.message or "type" in info.value.message


# ----------------------------------------------------------------- the shipped policy


def test_policy_is_valid_xml_with_every_action() -> None:
    if shutil.which("xmllint"):
        subprocess.run(["xmllint", "--noout", str(POLICY)], check=True)
    actions = {a.get("id"): a for a in ET.parse(POLICY).getroot().iter("action")}
    assert set(actions) == {
        polkit.ACTION_RUN,
        polkit.ACTION_CONTROL,
        polkit.ACTION_CONTROL_ANY,
        polkit.ACTION_CONTROL_CATALOG,
        polkit.ACTION_ADOPT,
        polkit.ACTION_MANAGE,
    }
    for action_id, action in actions.items():
        defaults = {d.tag: d.text for d in action.find("defaults")}  # type: ignore[union-attr]
        assert defaults["allow_any"] == "no", action_id
        assert defaults["allow_inactive"] in ("auth_admin", "auth_admin_keep"), action_id
        assert defaults["allow_active"] in ("auth_admin", "auth_admin_keep"), action_id
    implied = {
        a.get("id"): set((a.find("annotate[@key='org.freedesktop.policykit.imply']").text or "").split())
        for a in actions.values()
        if a.find("annotate[@key='org.freedesktop.policykit.imply']") is not None
    }
    assert implied[polkit.ACTION_MANAGE] == set(actions) - {polkit.ACTION_MANAGE}
    assert implied[polkit.ACTION_CONTROL_ANY] == {polkit.ACTION_CONTROL, polkit.ACTION_CONTROL_CATALOG}


# ----------------------------------------------------------------- Authority: systemd's semantics


@pytest.mark.parametrize(
    ("uid", "reply", "interactive", "expected"),
    [
        (0, None, False, "ok"),  # root passes without asking
        (1000, (True, False, {}), False, "ok"),
        (1000, (False, False, {}), True, "org.freedesktop.DBus.Error.AccessDenied"),
        (1000, (False, True, {}), False, "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"),
        (1000, (False, True, {}), True, "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"),
        (1000, DBusError("org.freedesktop.DBus.Error.ServiceUnknown", "no polkit"), False, ACCESS_DENIED),
        (1000, DBusError("org.freedesktop.PolicyKit1.Error.Failed", "boom"), True, ACCESS_DENIED),
    ],
)
async def test_authority_semantics(
    monkeypatch: pytest.MonkeyPatch, uid: int, reply: Any, interactive: bool, expected: str
) -> None:
    sent: list[tuple[str, list[Any]]] = []

    async def fake_call(
        bus: Any, dest: str, path: str, iface: str, member: str, sig: str, body: list[Any]
    ) -> list[Any]:
        sent.append((member, body))
        if member == "GetConnectionUnixUser":
            return [uid]
        if isinstance(reply, Exception):
            raise reply
        return [list(reply)]

    monkeypatch.setattr(polkit, "call", fake_call)
    flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
    msg = Message(sender=":1.7", path="/org/gpusched1", member="Freeze", flags=flags)
    try:
        assert await polkit.Authority(None).check(msg, polkit.ACTION_RUN, {"verb": "run"}) == uid  # type: ignore[arg-type]
        outcome = "ok"
    except GpuschedError as e:
        outcome = e.dbus_name
    assert outcome == expected
    checks = [body for member, body in sent if member == "CheckAuthorization"]
    if uid == 0:
        assert checks == []
    else:
        [[subject, action, details, check_flags, _cancel]] = checks
        assert subject[0] == "system-bus-name" and subject[1]["name"].value == ":1.7"
        assert (action, details, check_flags) == (polkit.ACTION_RUN, {"verb": "run"}, 1 if interactive else 0)


async def test_checks_in_flight_are_bounded_per_caller_and_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of calls from one user must not use up the daemon's budget of awaited replies on the bus."""
    in_flight: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def fake_call(
        bus: Any, dest: str, path: str, iface: str, member: str, sig: str, body: list[Any]
    ) -> list[Any]:
        if member == "GetConnectionUnixUser":
            return [1000]
        sender = body[0][1]["name"].value
        in_flight[sender] = in_flight.get(sender, 0) + 1
        in_flight["all"] = in_flight.get("all", 0) + 1
        for key in (sender, "all"):
            peak[key] = max(peak.get(key, 0), in_flight[key])
        await asyncio.sleep(0.01)
        in_flight[sender] -= 1
        in_flight["all"] -= 1
        return [[True, False, {}]]

    monkeypatch.setattr(polkit, "call", fake_call)
    authority = polkit.Authority(None)  # type: ignore[arg-type]
    senders = [f":1.{i}" for i in range(20)]
    checks = [
        authority.check(Message(sender=s, path="/", member="Freeze"), polkit.ACTION_RUN, {})
        for s in senders
        for _ in range(10)
    ]
    assert await asyncio.gather(*checks) == [1000] * 200
    # Bounds, not targets: how many run at once depends on the scheduling of a loaded machine. That several
    # callers were checked at once shows the bounds were exercised.
    assert max(peak[s] for s in senders) <= polkit.MAX_CHECKS_PER_CALLER
    assert polkit.MAX_CHECKS_PER_CALLER < peak["all"] <= polkit.MAX_CHECKS_IN_FLIGHT
    assert authority._callers == {}  # nothing kept for callers that are done


async def test_running_a_name_again_over_someone_elses_ended_model_needs_control_any(
    manager: ManagerInterface, engine: Engine, authority: FakeAuthority
) -> None:
    await engine.run("x", ["/bin/true"], RunOptions(), 0)
    await engine.stop("x")
    authority.allowed |= {(NOBODY.pw_uid, polkit.ACTION_RUN), (NOBODY.pw_uid, polkit.ACTION_CONTROL)}
    with as_(":1.2"):
        assert await error_of(call(manager, "Run", "x", ["/bin/true"], {})) == ACCESS_DENIED
        assert authority.asked[-1][1] == polkit.ACTION_CONTROL_ANY
        assert engine.get("x").owner == 0 and engine.get("x").state == State.STOPPED
        await call(manager, "Run", "mine", ["/bin/true"], {})
        await call(manager, "Stop", "mine")
        await call(manager, "Run", "mine", ["/bin/true"], {})  # my own ended model: run is enough
    assert engine.get("mine").state == State.RUNNING


# ----------------------------------------------------------------- errors answered to callers become journal events


async def test_refusals_and_failures_are_events_naming_caller_method_and_error(
    manager: ManagerInterface, engine: Engine, authority: FakeAuthority
) -> None:
    events = Recorder()
    engine.add_listener(events)
    await engine.run("roots", ["/bin/true"], RunOptions(), 0)
    with as_(":1.2"):
        assert await error_of(call(manager, "Freeze", "roots")) == ACCESS_DENIED
        await error_of(call(manager, "Thaw", "../etc"))
    denied, bad_name = (e for e in events.events if e.kind == EventKind.REFUSAL)
    assert (denied.model, denied.unit) == ("roots", "gpusched-model@roots.service")
    assert denied.fields == {
        "GPUSCHED_ERROR": ACCESS_DENIED,
        "GPUSCHED_METHOD": "Freeze",
        "GPUSCHED_CALLER": ":1.2",
        "GPUSCHED_CALLER_UID": str(NOBODY.pw_uid),
    }
    assert denied.message.startswith(f"Freeze of roots refused for uid {NOBODY.pw_uid}: not authorized")
    assert journal_fields(denied)["PRIORITY"] == "4"
    # a malformed name is never written back; the caller's own mistake is only a notice
    assert bad_name.model == "" and "GPUSCHED_MODEL" not in journal_fields(bad_name)
    assert journal_fields(bad_name)["PRIORITY"] == "5"

    engine.units.fail["freeze"] = "gpusched-model@roots.service"  # type: ignore[attr-defined]
    with as_(":1.1"):
        assert await error_of(call(manager, "Freeze", "roots")) == "org.gpusched1.Error.UnitFailed"
    failure = events.events[-1]
    assert failure.kind == EventKind.FAILURE and failure.fields["GPUSCHED_CALLER_UID"] == "0"
    assert journal_fields(failure)["PRIORITY"] == "3"


async def test_an_error_the_engine_reported_is_not_reported_twice(engine: Engine) -> None:
    events = Recorder()
    engine.add_listener(events)
    error = InvalidArgs("x")
    engine.report_error(error, "m", "first", {})
    engine.report_error(error, "m", "second", {})
    assert [e.message for e in events.events] == ["first"]
