"""Hostile input at the bus boundary: hundreds of malformed calls, as root (past polkit, so every check of the input
is reached) and as bob (stopped by polkit or by the input checks, whichever comes first). Every one must be answered
with a typed error, no answer may show a traceback or an internal path, and afterwards the daemon answers and no
model or unit has changed."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from secutil import BOB, Reply, calls_as, ensure_users, manager, variant
from sysutil import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    MODEL_IFACE,
    Models,
    list_models,
    model_path,
    run,
)
from sysutil import (
    log as progress,
)

PROPS = "org.freedesktop.DBus.Properties"
# What a malformed call may be answered with: typed, never the generic Failed an unhandled exception becomes.
EXPECTED_ERRORS = {
    "org.freedesktop.DBus.Error.InvalidArgs",
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.PropertyReadOnly",
    "org.freedesktop.DBus.Error.InvalidSignature",
    "org.freedesktop.DBus.Error.AccessDenied",
    "org.gpusched1.Error.NoSuchModel",
    "org.gpusched1.Error.InvalidState",
    "org.gpusched1.Error.NotSupported",
}
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/usr/lib|site-packages|dbus_fast|gpuschedd\.|0x[0-9a-f]{6,}")

BAD_NAMES = [
    "", ".", "..", "../etc", "../../root", "a/b", "/abs", "a b", "-x", "_x", ".hidden", "x" * 65, "x" * 100_000,
    "a..b", "a\nb", "a\tb", "$(id)", "`id`", "a;b", "a|b", "a@b", "a:b", "a\\b", "*", "?", "%2e%2e", "é", "ß",
    "\u202eevil", "\u200b", "\x7f", "a\x01b", "💥", "gpusched-model@x.service/..", " lead", "trail ",
]  # fmt: skip
HUGE = "A" * (2 * 1024 * 1024)
BAD_ARGVS: list[list[str]] = [
    [],
    [""],
    ["", "x"],
    ["x" * 70_000],
    ["/bin/true"] * 5_000,
    ["/bin/true", HUGE],
    ["/bin/true"] + ["y" * 60_000] * 20,  # each fine, too long together
]
BAD_OPTIONS: list[dict[str, Any]] = [
    {"Bogus": variant("s", "x")},
    {"": variant("s", "x")},
    {"x" * 10_000: variant("s", "x")},
    {"user": variant("s", "root")},  # keys are case-sensitive
    {"Description": variant("u", 1)},
    {"Description": variant("as", ["a"])},
    {"Description": variant("v", variant("s", "nested"))},
    {"Description": variant("s", "x" * 1_000)},
    {"Description": variant("s", "line\nbreak")},
    {"Description": variant("s", "\x1b[31mred")},
    {"WorkingDirectory": variant("s", "relative")},
    {"WorkingDirectory": variant("s", "/" + "d" * 5_000)},
    {"WorkingDirectory": variant("b", True)},
    {"WorkingDirectory": variant("ay", ["@b", "2f746d70"])},
    {"Environment": variant("s", "A=1")},
    {"Environment": variant("as", ["NOEQUALS"])},
    {"Environment": variant("as", ["=x"])},
    {"Environment": variant("as", ["1A=x"])},
    {"Environment": variant("as", ["A B=x"])},
    {"Environment": variant("as", ["A=1"] * 2_000)},
    {"Environment": variant("as", ["A=" + "x" * 70_000])},
    {"Environment": variant("a{ss}", {"A": "1"})},
    {"Gpus": variant("s", "0")},
    {"Gpus": variant("au", [0])},
    {"Gpus": variant("as", ["0,1"])},
    {"Gpus": variant("as", ["all"])},
    {"Gpus": variant("as", ["-1"])},
    {"Gpus": variant("as", ["1000"])},
    {"Gpus": variant("as", ["GPU-../../x"])},
    {"Gpus": variant("as", ["GPU-" + "a" * 200])},
    {"Gpus": variant("as", [""])},
    {"Gpus": variant("as", ["0"] * 100)},
    {"User": variant("u", 0)},
    {"User": variant("s", "root;id")},
    {"User": variant("s", "../root")},
    {"User": variant("s", "x" * 100)},
    {"User": variant("s", "no-such-user-here")},
    {"User": variant("s", "0")},
    {"Description": variant("s", "ok"), "Bogus": variant("s", "x")},  # one bad key spoils the lot
]
WRONG_SIGNATURES: list[tuple[str, str, list[Any]]] = [
    ("Freeze", "", []),
    ("Freeze", "i", [1]),
    ("Freeze", "ss", ["a", "b"]),
    ("Freeze", "as", [["a"]]),
    ("Freeze", "v", [variant("s", "a")]),
    ("Thaw", "u", [0]),
    ("Stop", "o", ["/"]),
    ("Forget", "ay", [["@b", "00"]]),
    ("Swap", "s", ["a"]),
    ("Swap", "sss", ["a", "b", "c"]),
    ("Run", "", []),
    ("Run", "s", ["x"]),
    ("Run", "sas", ["x", ["/bin/true"]]),
    ("Run", "sasa{ss}", ["x", ["/bin/true"], {"User": "root"}]),
    ("Run", "ssa{sv}", ["x", "/bin/true", {}]),
    ("Run", "sasa{sv}s", ["x", ["/bin/true"], {}, "extra"]),
    ("Run", "(sasa{sv})", [["x", ["/bin/true"], {}]]),
    ("Run", "v", [variant("s", "x")]),
    ("Adopt", "sas", ["x", ["u"]]),
    ("AdoptProcesses", "sasa{sv}", ["x", ["1"], {}]),
    ("Migrate", "s", ["x"]),
    ("ListModels", "s", ["x"]),
    ("GetModel", "", []),
    ("GetModel", "i", [7]),
    ("NoSuchMethod", "", []),
    ("freeze", "s", ["x"]),  # members are case-sensitive
]


def _calls(live: str) -> list[dict[str, Any]]:
    """Every malformed call once. `live` is a running model: calls that would act on it must fail on their input."""
    calls: list[dict[str, Any]] = []
    for name in BAD_NAMES:
        for member in ("Freeze", "Thaw", "Stop", "Forget", "GetModel"):
            calls.append(manager(member, "s", name))
        calls.append(manager("Run", "sasa{sv}", name, ["/bin/true"], {}))
        calls.append(manager("Swap", "ss", live, name))
        calls.append(manager("Migrate", "ss", live, name))
    for argv in BAD_ARGVS:
        calls.append(manager("Run", "sasa{sv}", "fuzz-argv", argv, {}))
    for options in BAD_OPTIONS:
        calls.append(manager("Run", "sasa{sv}", "fuzz-opts", ["/bin/true"], options))
    for member, sig, body in WRONG_SIGNATURES:
        calls.append(manager(member, sig, *body))
    calls += [
        {"path": model_path(live), "interface": MODEL_IFACE, "member": "Freeze", "signature": "s", "body": ["x"]},
        {"path": model_path("nosuch"), "interface": MODEL_IFACE, "member": "Freeze"},
        {"path": "/org/gpusched1/model", "interface": MODEL_IFACE, "member": "Stop"},
        {"path": "/org/gpusched1/model/_2e_2e", "interface": MODEL_IFACE, "member": "Stop"},
        {"path": MANAGER_PATH, "interface": "org.gpusched1.Nope", "member": "Freeze", "signature": "s", "body": [live]},
        {"path": MANAGER_PATH, "interface": MODEL_IFACE, "member": "Stop"},
        {"path": "/", "interface": MANAGER_IFACE, "member": "Stop", "signature": "s", "body": [live]},
        {"path": MANAGER_PATH, "interface": PROPS, "member": "Get", "signature": "ss", "body": [MANAGER_IFACE, "Nope"]},
        {"path": MANAGER_PATH, "interface": PROPS, "member": "Get", "signature": "ss", "body": ["bogus.If", "Version"]},
        {"path": MANAGER_PATH, "interface": PROPS, "member": "Get", "signature": "s", "body": [MANAGER_IFACE]},
        {"path": MANAGER_PATH, "interface": PROPS, "member": "GetAll", "signature": "s", "body": ["x" * 300]},
        {"path": MANAGER_PATH, "interface": PROPS, "member": "Set", "signature": "ssv",
         "body": [MANAGER_IFACE, "Version", variant("s", "6.6.6")]},
        {"path": MANAGER_PATH, "interface": PROPS, "member": "Set", "signature": "ssv",
         "body": [MANAGER_IFACE, "RamBudgetBytes", variant("t", 1)]},
        {"path": model_path(live), "interface": PROPS, "member": "Set", "signature": "ssv",
         "body": [MODEL_IFACE, "Owner", variant("u", 0)]},
        {"path": model_path(live), "interface": PROPS, "member": "Set", "signature": "ssv",
         "body": [MODEL_IFACE, "State", variant("s", "frozen")]},
        {"path": model_path(live), "interface": PROPS, "member": "Set", "signature": "ssv",
         "body": [MODEL_IFACE, "Command", variant("as", ["/bin/sh"])]},
        {"path": MANAGER_PATH, "interface": None, "member": "Stop", "signature": "s", "body": ["nosuch"]},
    ]  # fmt: skip
    return calls


def _reached_daemon(reply: Reply) -> bool:
    """False when the call never got to gpuschedd: the client library would not send it (an invalid object path),
    or dbus-daemon's bus policy refused it (an interface the policy does not list, or none)."""
    if (reply.error or "").startswith("client:"):
        return False
    return not (reply.error == "org.freedesktop.DBus.Error.AccessDenied" and reply.text.startswith("Rejected send"))


def _check(who: str, calls: list[dict[str, Any]], replies: list[Reply]) -> None:
    bad = []
    for call, reply in zip(calls, replies, strict=True):
        body = str(call.get("body", []))[:80]
        what = f"{who}: {call.get('interface')}.{call['member']}({call.get('signature', '')}) {body}"
        if not _reached_daemon(reply):
            continue
        if reply.ok:
            bad.append(f"{what} succeeded")
        elif reply.error not in EXPECTED_ERRORS:
            bad.append(f"{what} → {reply.error}: {reply.text[:200]}")
        elif LEAKS.search(reply.text) or len(reply.text) > 1000:
            bad.append(f"{what} → {reply.error} leaks internals or echoes too much: {reply.text[:300]!r}")
    assert not bad, "\n".join(bad)


def _snapshot() -> dict[str, tuple[Any, ...]]:
    """What a malformed call must not change: each model's state, unit, owner and main PID."""
    return {k: (v["state"], v["unit"], v["owner"], v["main_pid"]) for k, v in list_models().items()}


def _units() -> str:
    return run("systemctl", "list-units", "--all", "--plain", "--no-legend", "gpusched-model@*").stdout


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    ensure_users()


def test_fuzz_the_bus_api(models: Models) -> None:
    live, counter = models.run("live")
    before, units_before = _snapshot(), _units()
    calls = _calls(live)
    assert len(calls) >= 200
    started = time.time()
    for who in ("root", BOB):
        replies = calls_as(who, calls, timeout=300)
        reached = sum(1 for r in replies if _reached_daemon(r))
        progress(f"{who}: {len(calls)} malformed calls, {reached} reached the daemon")
        assert reached >= 200
        _check(who, calls, replies)
    # the daemon still answers, and nothing changed
    assert _snapshot() == before
    assert _units() == units_before
    counter.assert_moving()
    # no call ended in an unhandled exception (exposed() logs those as "ERROR gpuschedd.bus.service: X failed")
    journal = run("journalctl", "--no-pager", "-u", "gpuschedd.service", f"--since=@{started:.6f}").stdout
    assert "ERROR gpuschedd.bus.service" not in journal, journal[-3000:]


def test_fuzz_with_the_command_line_tools(models: Models) -> None:
    """Wrong signatures and odd strings through busctl and gdbus, the tools an admin (or attacker) reaches for."""
    live, counter = models.run("live")
    before = _snapshot()
    busctl = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE]
    gdbus = ["gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH, "--method"]
    attempts = [
        [*busctl, "Freeze", "i", "1"],
        [*busctl, "Freeze", "ss", live, live],
        [*busctl, "Freeze", "s", "../" + live],
        [*busctl, "Freeze", "s", "x" * 100_000],
        [*busctl, "Run", "sasa{sv}", "fz", "0", "0"],
        [*busctl, "Run", "sasa{sv}", "fz", "1", "", "0"],
        [*busctl, "Run", "sasa{sv}", "fz", "1", "/bin/true", "1", "Gpus", "s", "0"],
        [*busctl, "Run", "sasa{sv}", "fz", "1", "/bin/true", "1", "User", "u", "0"],
        [*busctl, "Run", "sasa{sv}", "fz", "1", "/bin/true", "1", "Nope", "s", "x"],
        [*busctl, "Run", "sas", "fz", "1", "/bin/true"],
        [*busctl, "Swap", "ss", live, "../x"],
        [*gdbus, f"{MANAGER_IFACE}.Run", "fz", "[]", "{}"],
        [*gdbus, f"{MANAGER_IFACE}.Run", "a/b", "['/bin/true']", "{}"],
        [*gdbus, f"{MANAGER_IFACE}.Run", "fz", "['/bin/true']", "{'Environment': <['X']>}"],
        [*gdbus, f"{MANAGER_IFACE}.Run", "fz", "['/bin/true']", "{'WorkingDirectory': <'tmp'>}"],
        [*gdbus, f"{MANAGER_IFACE}.Run", "fz", "['/bin/true']", "{'Gpus': <['0;1']>}"],
        [*gdbus, f"{MANAGER_IFACE}.Freeze", "$(reboot)"],
        [*gdbus, f"{MANAGER_IFACE}.Stop", "gpusched-model@x.service"],
    ]
    for who in ("root", BOB):
        for argv in attempts:
            proc = run(*(argv if who == "root" else ["setpriv", f"--reuid={who}", f"--regid={who}", "--init-groups",
                                                     *argv]), check=False)  # fmt: skip
            assert proc.returncode != 0, f"{who}: {argv[:12]} succeeded"
            assert not LEAKS.search(proc.stderr), f"{who}: {argv[:12]}: {proc.stderr[:500]}"
    assert _snapshot() == before
    counter.assert_moving()
