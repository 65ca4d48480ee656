"""What one local user can keep, see and write through the daemon (issue 15: secrets, limits, safe text) and what
ListModels answers from (issue 21: the table kept by events, not a systemd round trip per model).

The daemon runs with small limits for this module (MaxModelsPerUser=3, MaxCommandBytesPerUser=64K,
EndedModelTTLSec=3). alice is in the group gpusched and runs models as herself; bob is not, and reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fakegpu_sys import CONF, restart_daemon
from secutil import ALICE, BOB, Reply, as_user_argv, calls_as, ensure_users, manager, run_as, uid_of, variant
from sysutil import MODEL_IFACE, Models, list_models, model_path, model_unit, run, unit_property, wait_until

SECRET = "hf_s3cr3t-t0ken-4-test"
LIMITS = "MaxModelsPerUser=3\nMaxCommandBytesPerUser=64K\nEndedModelTTLSec=3\n"
LIMIT_EXCEEDED = "org.gpusched1.Error.LimitExceeded"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
PROPS = "org.freedesktop.DBus.Properties"
# Extra arguments become $1… of a shell that only sleeps: argv of any size, a model that keeps running.
SLEEPER = ["/bin/sh", "-c", "exec sleep 3600", "sh"]


@pytest.fixture(scope="module", autouse=True)
def small_limits() -> Iterator[None]:
    ensure_users()
    saved = CONF.read_text() if CONF.exists() else None
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text((saved if saved is not None else "[Daemon]\n") + "\n" + LIMITS)
    restart_daemon()
    try:
        yield
    finally:
        if saved is None:
            CONF.unlink(missing_ok=True)
        else:
            CONF.write_text(saved)
        restart_daemon()


def alice_run(models: Models, suffix: str, argv: list[str], options: dict[str, Any] | None = None) -> Reply:
    """Run as alice over D-Bus; the name is cleaned up by the `models` fixture whatever happens."""
    name = models.name(suffix)
    models.names.append(name)
    [reply] = calls_as(ALICE, [manager("Run", "sasa{sv}", name, argv, options or {})])
    return reply


def alice_models() -> list[str]:
    alice = uid_of(ALICE)
    return [name for name, row in list_models().items() if row["owner"] == alice]


def get(path: str, prop: str) -> dict[str, Any]:
    return {"path": path, "interface": PROPS, "member": "Get", "signature": "ss", "body": [MODEL_IFACE, prop]}


def get_all(path: str) -> dict[str, Any]:
    return {"path": path, "interface": PROPS, "member": "GetAll", "signature": "s", "body": [MODEL_IFACE]}


def test_command_and_environment_are_only_for_the_owner_and_root(models: Models) -> None:
    """bob reads alice's model by every route (Get, GetAll, ListModels, Introspect, the CLI's status and --json)
    and never sees her token, given in argv and in Environment; alice and root read her Command."""
    argv = [*SLEEPER, f"--token={SECRET}"]
    reply = alice_run(models, "secret", argv, {"Environment": variant("as", [f"HF_TOKEN={SECRET}"])})
    assert reply.ok, str(reply)
    name = models.names[-1]
    path = model_path(name)
    reads = [
        get(path, "Command"),
        get_all(path),
        manager("ListModels"),
        {"path": path, "interface": "org.freedesktop.DBus.Introspectable", "member": "Introspect"},
        {"path": "/org/gpusched1", "interface": "org.freedesktop.DBus.Introspectable", "member": "Introspect"},
    ]
    by_bob = calls_as(BOB, reads)
    assert all(r.ok for r in by_bob), [str(r) for r in by_bob]
    assert SECRET not in json.dumps([r.body for r in by_bob])
    assert by_bob[0].body == [[]] and by_bob[1].body[0]["Command"] == []
    for args in (["status", name], ["--json", "status", name], ["--json", "list"]):
        out = run(*as_user_argv(BOB, "gpusched", *args), check=False).stdout
        assert name in out and SECRET not in out, out
    by_alice = calls_as(ALICE, [get(path, "Command"), get_all(path)])
    assert by_alice[0].body == [argv] and by_alice[1].body[0]["Command"] == argv
    assert SECRET in run_as(ALICE, "gpusched", "status", name).stdout
    [by_root] = calls_as("root", [get(path, "Command")])
    assert by_root.body == [argv]


def test_per_user_limits_refuse_and_change_nothing(models: Models) -> None:
    """alice's 4th model, and a model whose argv would take her past 64K, are refused with LimitExceeded: no unit,
    no entry in the table. Root is exempt."""
    wait_until("alice's ended models from earlier tests dropped", lambda: not alice_models())
    for i in range(3):
        assert alice_run(models, f"lim{i}", SLEEPER).ok
    before = list_models()
    refused = alice_run(models, "lim3", SLEEPER)
    assert not refused.ok and refused.error == LIMIT_EXCEEDED, str(refused)
    assert "MaxModelsPerUser" in refused.text
    assert models.names[-1] not in list_models() and list_models().keys() == before.keys()
    assert unit_property(model_unit(models.names[-1]), "LoadState") == "not-found"
    # An ended model counts until it is forgotten (or dropped after EndedModelTTLSec=): Stop, then Forget.
    done = calls_as(ALICE, [manager("Stop", "s", models.names[0]), manager("Forget", "s", models.names[0])])
    assert all(r.ok for r in done), [str(r) for r in done]
    big = alice_run(models, "big", [*SLEEPER, "x" * 40_000, "y" * 30_000])
    assert not big.ok and big.error == LIMIT_EXCEEDED and "MaxCommandBytesPerUser" in big.text, str(big)
    assert models.names[-1] not in list_models()
    # Root is not limited: the same command line runs.
    root_name = models.name("root-big")
    models.names.append(root_name)
    [by_root] = calls_as("root", [manager("Run", "sasa{sv}", root_name, [*SLEEPER, "x" * 40_000, "y" * 30_000], {})])
    assert by_root.ok, str(by_root)


def test_oversized_arguments_are_refused_before_polkit_is_asked(models: Models) -> None:
    """A Run over the 1 MiB bound is InvalidArgs even for bob, whom polkit would refuse: the sizes are checked
    first, so no such call is held while polkitd thinks."""
    big = [*SLEEPER, *(["x" * 65_000] * 17)]
    name = models.name("huge")
    for user in (BOB, ALICE):
        [reply] = calls_as(user, [manager("Run", "sasa{sv}", name, big, {})])
        assert not reply.ok and reply.error == INVALID_ARGS and "1048576 bytes" in reply.text, str(reply)
    assert name not in list_models()


def test_ended_model_is_dropped_after_its_ttl(models: Models) -> None:
    assert alice_run(models, "ttl", SLEEPER).ok
    name = models.names[-1]
    [stopped] = calls_as(ALICE, [manager("Stop", "s", name)])
    assert stopped.ok and list_models()[name]["state"] == "stopped"
    wait_until("the ended model dropped", lambda: name not in list_models(), timeout=30)
    entries = journal_json(f"GPUSCHED_MODEL={name}", "GPUSCHED_EVENT=forget")
    assert [e.get("GPUSCHED_REASON") for e in entries] == ["ended-ttl"]


def journal_json(*matches: str) -> list[dict[str, Any]]:
    out = run("journalctl", "--no-pager", "-o", "json", "_UID=0", *matches, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_newline_in_argv0_does_not_forge_a_journal_line(models: Models) -> None:
    forged = "gpuschedd[1]: model root-db frozen in 0.1s"
    reply = alice_run(models, "forge", [f"no-such-command\n{forged}", "x"])
    assert not reply.ok and reply.error == INVALID_ARGS, str(reply)
    name = models.names[-1]
    entries = wait_until("the refusal's journal entry", lambda: journal_json(f"GPUSCHED_MODEL={name}"))
    message = entries[-1]["MESSAGE"]
    assert isinstance(message, str) and "\n" not in message and "\\n" + forged in message, message
    assert "\n" not in reply.text


def test_format_characters_in_description_are_refused(models: Models) -> None:
    for text in ("model \u202efdp.exe", "zero\u200bwidth", "tab\there", "line\u2028sep"):
        reply = alice_run(models, "bidi", SLEEPER, {"Description": variant("s", text)})
        assert not reply.ok and reply.error == INVALID_ARGS, str(reply)
    assert models.names[-1] not in list_models()


def test_list_models_follows_changes_made_behind_the_daemons_back(models: Models) -> None:
    """ListModels answers from the table: a model started, killed and stopped with systemctl shows as systemd
    has it, from the unit events and the periodic refresh alone."""
    name, _counter = models.run("behind")
    unit = model_unit(name)
    assert list_models()[name]["main_pid"] == int(unit_property(unit, "MainPID"))
    run("systemctl", "kill", "--signal=KILL", unit)
    wait_until("the killed model reported failed", lambda: list_models()[name]["state"] == "failed")
    assert list_models()[name]["main_pid"] == 0
    other, _ = models.run("behind2")
    run("systemctl", "stop", model_unit(other))
    wait_until("the stopped model reported", lambda: list_models()[other]["state"] in ("stopped", "failed"))
