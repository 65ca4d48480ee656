"""Who may do what, against the real polkitd with the shipped policy and rules (installed by `make install`).

alice is in the group gpusched: she runs models as herself and controls her own without a password. bob is not:
he reads everything and changes nothing. Neither touches root's models, runs anything as someone else, or owns
the bus name. Root does everything. Outside a logind session (the sandbox has none, like ssh logins) polkit uses
the allow_any defaults, which are "no": a denial is AccessDenied, not a password prompt.
"""

from __future__ import annotations

import concurrent.futures
import grp
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from secutil import (
    ALICE,
    BOB,
    GROUP,
    Reply,
    as_user_argv,
    call_as,
    calls_as,
    ensure_users,
    manager,
    proc_ids,
    run_as,
    uid_of,
    user_counter,
    variant,
)
from sysutil import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    MODEL_IFACE,
    Counter,
    Models,
    cgroup_pids,
    list_models,
    model_path,
    model_property,
    model_unit,
    run,
    unit_property,
    wait_until,
)

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INTERACTIVE = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
TEST_RULES = Path("/etc/polkit-1/rules.d/10-gpusched-test.rules")
READ_ONLY = {"ListModels", "GetModel"}  # the only members anyone may call


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    ensure_users()


def run_as_alice(models: Models, suffix: str) -> tuple[str, Counter]:
    """alice starts a counter model with the installed CLI, as she would from her shell."""
    name = models.name(suffix)
    models.names.append(name)
    counter = user_counter(ALICE, name)
    run_as(ALICE, "gpusched", "--no-ask-password", "run", "--name", name, "--", *counter.argv())
    counter.assert_moving()
    return name, counter


def assert_denied(reply: Reply, error: str = ACCESS_DENIED) -> None:
    assert not reply.ok and reply.error == error, str(reply)
    assert "Traceback" not in reply.text and ".py" not in reply.text


# ----------------------------------------------------------------- alice: her own models, as herself


def test_alice_runs_a_model_as_alice(models: Models) -> None:
    name, counter = run_as_alice(models, "mine")
    alice = uid_of(ALICE)
    assert list_models()[name]["owner"] == alice
    assert model_property(name, "Owner") == alice
    unit = model_unit(name)
    assert unit_property(unit, "User") == ALICE
    pids = cgroup_pids(unit)
    assert pids
    gpusched_gid = grp.getgrnam(GROUP).gr_gid
    for pid in pids:
        ids = proc_ids(pid)
        assert ids["Uid"] == [alice] * 4, f"pid {pid}: {ids}"
        assert ids["Gid"] == [grp.getgrnam(ALICE).gr_gid] * 4, f"pid {pid}: {ids}"
        assert gpusched_gid in ids["Groups"], f"pid {pid} lacks alice's supplementary groups: {ids}"
    counter.assert_moving()


def test_alice_freezes_and_thaws_without_a_password(models: Models) -> None:
    name, counter = run_as_alice(models, "ft")
    # the CLI without any agent: no password may be asked for
    run_as(ALICE, "gpusched", "--no-ask-password", "freeze", name)
    assert model_property(name, "State") == "frozen"
    counter.assert_still()
    run_as(ALICE, "gpusched", "--no-ask-password", "thaw", name)
    counter.assert_moving()
    # busctl, the message without the interactive flag; and the model object's own methods
    run_as(ALICE, "busctl", "--system", "--allow-interactive-authorization=no", "call", BUS_NAME, MANAGER_PATH,
           MANAGER_IFACE, "Freeze", "s", name)  # fmt: skip
    counter.assert_still()
    run_as(ALICE, "busctl", "--system", "--allow-interactive-authorization=no", "call", BUS_NAME, model_path(name),
           MODEL_IFACE, "Thaw")  # fmt: skip
    counter.assert_moving()
    run_as(ALICE, "gpusched", "--no-ask-password", "stop", name)
    assert model_property(name, "State") == "stopped"


def test_alice_cannot_touch_roots_model_nor_run_as_anyone_else(models: Models) -> None:
    roots, root_counter = models.run("root")
    mine, my_counter = run_as_alice(models, "alice")
    denied = calls_as(
        ALICE,
        [
            manager("Freeze", "s", roots),
            manager("Thaw", "s", roots),
            manager("Stop", "s", roots),
            manager("Forget", "s", roots),
            manager("Migrate", "ss", roots, "0"),
            # a swap acts on both models: mine would be frozen, root's thawed
            manager("Swap", "ss", mine, roots),
            manager("Swap", "ss", roots, mine),
            {"path": model_path(roots), "interface": MODEL_IFACE, "member": "Freeze"},
            {"path": model_path(roots), "interface": MODEL_IFACE, "member": "Stop"},
            # running as someone else needs manage, whoever that is: root, bob, or alice herself by name
            manager("Run", "sasa{sv}", models.name("asroot"), ["/bin/true"], {"User": variant("s", "root")}),
            manager("Run", "sasa{sv}", models.name("asbob"), ["/bin/true"], {"User": variant("s", BOB)}),
            manager("Run", "sasa{sv}", models.name("asalice"), ["/bin/true"], {"User": variant("s", ALICE)}),
            # the same with the interactive flag: no agent can answer, so still no
            manager("Stop", "s", roots, interactive=True),
            manager(
                "Run",
                "sasa{sv}",
                models.name("asroot"),
                ["/bin/true"],
                {"User": variant("s", "root")},
                interactive=True,
            ),
        ],
    )
    for reply in denied:
        assert_denied(reply)
    root_counter.assert_moving()
    my_counter.assert_moving()
    assert list_models()[roots]["state"] == "running" and list_models()[mine]["state"] == "running"
    for suffix in ("asroot", "asbob", "asalice"):
        assert models.name(suffix) not in list_models()
        assert unit_property(model_unit(models.name(suffix)), "LoadState") == "not-found"


# ----------------------------------------------------------------- bob: reads, never changes


def test_bob_reads_everything(models: Models) -> None:
    name, _ = run_as_alice(models, "read")
    rows = calls_as(
        BOB,
        [
            manager("ListModels"),
            manager("GetModel", "s", name),
            {
                "path": model_path(name),
                "interface": "org.freedesktop.DBus.Properties",
                "member": "GetAll",
                "signature": "s",
                "body": [MODEL_IFACE],
            },
            {
                "path": MANAGER_PATH,
                "interface": "org.freedesktop.DBus.Properties",
                "member": "GetAll",
                "signature": "s",
                "body": [MANAGER_IFACE],
            },
            {"path": MANAGER_PATH, "interface": "org.freedesktop.DBus.Introspectable", "member": "Introspect"},
        ],
    )
    assert all(r.ok for r in rows), [str(r) for r in rows]
    assert name in [row[0] for row in rows[0].body[0]]
    assert rows[1].body == [model_path(name)]
    assert rows[2].body[0]["Owner"] == uid_of(ALICE) and rows[2].body[0]["State"] == "running"
    assert "Version" in rows[3].body[0]
    run_as(BOB, "gpusched", "list")
    assert name in run_as(BOB, "gpusched", "status").stdout


def test_bob_cannot_freeze_stop_or_run(models: Models) -> None:
    name, counter = run_as_alice(models, "victim")
    for interactive in (False, True):
        replies = calls_as(
            BOB,
            [
                manager("Freeze", "s", name, interactive=interactive),
                manager("Stop", "s", name, interactive=interactive),
                manager("Forget", "s", name, interactive=interactive),
                manager("Run", "sasa{sv}", models.name("bobs"), ["/bin/true"], {}, interactive=interactive),
            ],
        )
        for reply in replies:
            assert_denied(reply)
    # the tools a user would reach for, with their defaults (both allow interactive authorization)
    for argv in (
        ["gpusched", "freeze", name],
        ["gpusched", "stop", name],
        ["gpusched", "run", "--name", models.name("bobs"), "--", "/bin/true"],
        ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Freeze", "s", name],
    ):
        proc = run_as(BOB, *argv, check=False)
        assert proc.returncode != 0, argv
        assert "Traceback" not in proc.stderr
    proc = run_as(BOB, "gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                  "--method", f"{MANAGER_IFACE}.Stop", name, check=False)  # fmt: skip
    assert f"GDBus.Error:{ACCESS_DENIED}:" in proc.stderr
    counter.assert_moving()
    assert list_models()[name]["state"] == "running"
    assert models.name("bobs") not in list_models()


def test_bob_cannot_own_the_bus_name() -> None:
    proc = run_as(BOB, "dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                  "/org/freedesktop/DBus", "org.freedesktop.DBus.RequestName", f"string:{BUS_NAME}", "uint32:4",
                  check=False)  # fmt: skip
    assert proc.returncode != 0
    assert ACCESS_DENIED in proc.stderr


def _signature_sample(sig: str, name: str) -> list[Any]:
    """One plausible argument per complete type of `sig`; every string is an existing model's name, so each call
    gets as far as the authorization (not stopped early by NoSuchModel or InvalidArgs)."""
    samples = {"s": name, "o": "/", "u": 1, "i": 1, "t": 1, "x": 1, "b": False, "d": 1.0, "as": ["/bin/true"],
               "au": [1], "a{sv}": {}, "a{ss}": {}, "v": variant("s", name)}  # fmt: skip
    out = []
    i = 0
    while i < len(sig):
        for length in (5, 2, 1):
            if sig[i : i + length] in samples:
                out.append(samples[sig[i : i + length]])
                i += length
                break
        else:
            raise AssertionError(f"no sample for signature {sig!r} at {i}: extend _signature_sample")
    return out


def _mutating_members(path: str) -> list[tuple[str, str, str]]:
    """(interface, member, in-signature) of every method of our interfaces at `path`, from the live
    introspection as bob sees it, except the documented read-only ones."""
    [xml] = calls_as(BOB, [{"path": path, "interface": "org.freedesktop.DBus.Introspectable", "member": "Introspect"}])
    assert xml.ok, str(xml)
    members = []
    for iface in ET.fromstring(xml.body[0]).iter("interface"):
        if not iface.get("name", "").startswith("org.gpusched1."):
            continue
        for method in iface.iter("method"):
            if method.get("name") in READ_ONLY:
                continue
            sig = "".join(a.get("type", "") for a in method.iter("arg") if a.get("direction", "in") == "in")
            members.append((iface.get("name", ""), method.get("name", ""), sig))
    return members


def test_default_deny_every_mutating_member_as_bob(models: Models) -> None:
    """Walk the live introspection: every method that is not documented as read-only is AccessDenied for bob,
    on the manager and on a model object, and no property can be set. A member added without an explicit
    action fails closed (the bus layer's default is manage), and this test finds it."""
    name, counter = run_as_alice(models, "walk")
    before = list_models()
    calls = []
    for path in (MANAGER_PATH, model_path(name)):
        for iface, member, sig in _mutating_members(path):
            for interactive in (False, True):
                calls.append({"path": path, "interface": iface, "member": member, "signature": sig,
                              "body": _signature_sample(sig, name), "interactive": interactive})  # fmt: skip
    members = {(c["path"], c["member"]) for c in calls}
    # the walk found what the API documents (so an empty introspection cannot pass this test)
    assert {"Run", "Freeze", "Thaw", "Swap", "Stop", "Forget", "Adopt", "AdoptProcesses", "Migrate"} <= {
        m for p, m in members if p == MANAGER_PATH
    }
    assert {"Freeze", "Thaw", "Stop"} <= {m for p, m in members if p != MANAGER_PATH}
    replies = calls_as(BOB, calls)
    for call, reply in zip(calls, replies, strict=True):
        # Start of a model that is not the catalog's is NoSuchModel before polkit (Catalog is a public property);
        # bob's Start of a catalog model is denied in test_catalog_models.py
        expected = "org.gpusched1.Error.NoSuchModel" if call["member"] == "Start" else ACCESS_DENIED
        assert not reply.ok and reply.error == expected, f"{call['path']} {call['member']}: {reply}"
    # properties: all read-only, for everyone
    props = []
    for path, iface in ((MANAGER_PATH, MANAGER_IFACE), (model_path(name), MODEL_IFACE)):
        [all_props] = calls_as(BOB, [{"path": path, "interface": "org.freedesktop.DBus.Properties",
                                      "member": "GetAll", "signature": "s", "body": [iface]}])  # fmt: skip
        for prop in all_props.body[0]:
            props.append({"path": path, "interface": "org.freedesktop.DBus.Properties", "member": "Set",
                          "signature": "ssv", "body": [iface, prop, variant("u", 0)]})  # fmt: skip
    assert len(props) >= 10
    for call, reply in zip(props, calls_as(BOB, props), strict=True):
        assert not reply.ok, f"bob set {call['body'][1]}"
    counter.assert_moving()
    after = list_models()
    assert {k: v for k, v in after.items() if k in before} == before


# ----------------------------------------------------------------- root


def test_root_does_everything(models: Models) -> None:
    mine, my_counter = run_as_alice(models, "a")
    theirs = models.name("asbob")
    models.names.append(theirs)
    bob_counter = user_counter(BOB, theirs)
    # only root (manage) may choose the user: the model is bob's, and runs as bob
    run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Run", "sasa{sv}", theirs,
        str(len(bob_counter.argv())), *bob_counter.argv(), "1", "User", "s", BOB)  # fmt: skip
    bob_counter.assert_moving()
    assert list_models()[theirs]["owner"] == uid_of(BOB)
    for pid in cgroup_pids(model_unit(theirs)):
        assert proc_ids(pid)["Uid"] == [uid_of(BOB)] * 4
    # root controls everybody's models, with the interactive flag off (root never needs polkit)
    replies = calls_as("root", [manager("Freeze", "s", mine), manager("Swap", "ss", theirs, mine)])
    assert all(r.ok for r in replies), [str(r) for r in replies]
    my_counter.assert_moving()
    bob_counter.assert_still()
    replies = calls_as("root", [manager("Stop", "s", theirs), manager("Stop", "s", mine)])
    assert all(r.ok for r in replies), [str(r) for r in replies]
    assert list_models()[mine]["state"] == list_models()[theirs]["state"] == "stopped"


def test_a_root_caller_gets_root_and_nobody_else_does(models: Models) -> None:
    name, _ = models.run("asroot")
    for pid in cgroup_pids(model_unit(name)):
        assert proc_ids(pid)["Uid"] == [0] * 4
    assert list_models()[name]["owner"] == 0


# ----------------------------------------------------------------- admins' rules on the details


@pytest.fixture
def test_rules() -> Iterator[Path]:
    yield TEST_RULES
    TEST_RULES.unlink(missing_ok=True)
    run("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "ReloadConfig")  # fmt: skip


def _pkcheck(user: str, action: str, details: dict[str, str]) -> int:
    """polkit's own answer for a process of `user` (0 yes, 1 no, 2 challenge), without touching the daemon."""
    sleeper = subprocess.Popen(as_user_argv(user, "sleep", "30"))
    try:
        argv = ["pkcheck", "--action-id", action, "--process", str(sleeper.pid)]
        for key, value in details.items():
            argv += ["--detail", key, value]
        return run(*argv, check=False).returncode
    finally:
        sleeper.kill()
        sleeper.wait()


def test_admin_rules_see_the_details(models: Models, test_rules: Path) -> None:
    """What docs/security.md shows admins: bob may freeze and thaw one shared model, never stop it; alice must
    authenticate to stop hers (a challenge: InteractiveAuthorizationRequired, with or without the flag, since no
    agent can answer here)."""
    shared, counter = run_as_alice(models, "shared")
    test_rules.write_text(
        "polkit.addRule(function(action, subject) {\n"
        f'    if (action.id == "org.gpusched1.control-any" && subject.user == "{BOB}" &&\n'
        f'        action.lookup("model") == "{shared}" &&\n'
        '        (action.lookup("verb") == "freeze" || action.lookup("verb") == "thaw")) {\n'
        "        return polkit.Result.YES;\n"
        "    }\n"
        f'    if (action.id == "org.gpusched1.control" && subject.user == "{ALICE}" &&\n'
        '        action.lookup("verb") == "stop") {\n'
        "        return polkit.Result.AUTH_ADMIN;\n"
        "    }\n"
        "});\n"
    )
    # polkitd reads rules by inotify: wait until its answer shows the new rule
    wait_until(
        "polkitd to load the test rules",
        lambda: _pkcheck(BOB, "org.gpusched1.control-any", {"model": shared, "verb": "freeze"}) == 0,
        timeout=10,
    )
    replies = calls_as(
        BOB,
        [
            manager("Freeze", "s", shared),
            manager("Thaw", "s", shared),
            manager("Stop", "s", shared),
            manager("Forget", "s", shared),
        ],
    )
    assert replies[0].ok and replies[1].ok, [str(r) for r in replies]
    assert_denied(replies[2])
    assert_denied(replies[3])
    counter.assert_moving()
    for interactive in (False, True):
        reply = call_as(ALICE, "Stop", "s", shared, interactive=interactive)
        assert_denied(reply, INTERACTIVE)
    assert "interactive" in call_as(ALICE, "Stop", "s", shared).text
    proc = run_as(ALICE, "gpusched", "--no-ask-password", "stop", shared, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    counter.assert_moving()
    run_as(ALICE, "gpusched", "--no-ask-password", "freeze", shared)  # other verbs unchanged
    counter.assert_still()


# ----------------------------------------------------------------- the caller is known per message


def test_concurrent_callers_never_borrow_each_others_authorization(models: Models) -> None:
    """dbus-fast hands a method no sender: the daemon keeps each call's message in a context variable. Many
    interleaved calls from alice (allowed) and bob (denied) on one model: every answer matches its caller."""
    name, counter = run_as_alice(models, "race")

    def burst(user: str) -> list[Reply]:
        # all 50 calls of one connection in flight at once, four connections at a time
        return calls_as(user, [manager(v, "s", name) for v in ["Freeze", "Thaw"] * 25], parallel=True)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {pool.submit(burst, u): u for u in (ALICE, BOB, ALICE, BOB)}
        results = {f: f.result() for f in futures}
    for future, replies in results.items():
        user = futures[future]
        for reply in replies:
            if user == ALICE:
                # alice may: her calls succeed or find the model mid-transition
                assert reply.ok or reply.error == "org.gpusched1.Error.InvalidState", str(reply)
            else:
                assert_denied(reply)
    run_as(ALICE, "gpusched", "--no-ask-password", "thaw", name)
    counter.assert_moving()
