"""Every state change is one structured journal entry, found by model, by event kind, and with the model's own unit
(`journalctl -u gpusched-model@NAME`, through OBJECT_SYSTEMD_UNIT=), as admins look for them."""

from __future__ import annotations

import json
import re
from typing import Any

from secutil import BOB, call_as, ensure_users, uid_of
from sysutil import Models, gpusched, model_property, model_unit, run, wait_until

# Fixed MESSAGE_IDs are an interface (admins' filters, the catalog): written here again, not imported.
FREEZE_ID = "4fe48b83b1b04f82ac3ece8dd506c426"
REFUSAL_ID = "1bec027d9f7947d1a84457cbc4efe55c"


def entries(*matches: str) -> list[dict[str, Any]]:
    out = run("journalctl", "--no-pager", "-o", "json", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_events_are_structured_entries(models: Models) -> None:
    name, _ = models.run("events")
    gpusched("freeze", name)
    gpusched("thaw", name)
    gpusched("stop", name)
    kinds = ("run", "freeze", "thaw", "stop")
    found = wait_until(
        "run, freeze, thaw and stop entries",
        lambda: (
            (got := {e["GPUSCHED_EVENT"]: e for e in entries(f"GPUSCHED_MODEL={name}")}).keys() >= set(kinds) and got
        ),
    )
    ids = set()
    for kind in kinds:
        entry = found[kind]
        assert entry["OBJECT_SYSTEMD_UNIT"] == model_unit(name)
        assert entry["_SYSTEMD_UNIT"] == "gpuschedd.service"
        assert re.fullmatch(r"[0-9a-f]{32}", entry["MESSAGE_ID"])
        assert name in entry["MESSAGE"]
        ids.add(entry["MESSAGE_ID"])
    assert len(ids) == len(kinds), "one MESSAGE_ID per event kind"
    assert int(found["freeze"]["GPUSCHED_DURATION_USEC"]) >= 0
    # the same entries under the model's unit, where `systemctl status` looks
    by_unit = {e.get("GPUSCHED_EVENT") for e in entries("-u", model_unit(name))}
    assert {"freeze", "thaw"} <= by_unit


def test_a_model_that_fails_is_logged(models: Models) -> None:
    name, _ = models.run("fails", argv=["/bin/sh", "-c", "sleep 0.3; exit 3"])
    entry = wait_until(
        "an exit or failure entry",
        lambda: [e for e in entries(f"GPUSCHED_MODEL={name}") if e["GPUSCHED_EVENT"] in ("exit", "failure")],
    )[0]
    assert entry["OBJECT_SYSTEMD_UNIT"] == model_unit(name)


def test_catalog_explains_a_freeze(models: Models) -> None:
    """`make post-install` ran `journalctl --update-catalog`: `journalctl -x` shows our text under the entry."""
    name, _ = models.run("catalog")
    gpusched("freeze", name)

    def explained() -> str:
        argv = [
            "journalctl",
            "--no-pager",
            "-x",
            "-u",
            "gpuschedd",
            f"MESSAGE_ID={FREEZE_ID}",
            f"GPUSCHED_MODEL={name}",
        ]
        out = run(*argv).stdout
        return out if "Subject:" in out else ""

    text = wait_until("the freeze entry with its catalog text", explained)
    assert f"Subject: GPU model {name} was frozen" in text
    assert "Defined-By: gpuschedd" in text
    assert f"The GPU model {name} (unit {model_unit(name)}) was frozen in" in text
    # A counter has no CUDA process: the entry says the cgroup path, which the catalog explains as no checkpoint
    [entry] = entries(f"MESSAGE_ID={FREEZE_ID}", f"GPUSCHED_MODEL={name}")
    assert (entry["GPUSCHED_FREEZE_PATH"], model_property(name, "FreezePath")) == ("cgroup", "cgroup")
    assert "cgroup      no process was checkpointed" in text.replace("░░ ", "")
    assert not re.search(r"@[A-Z_]+@", text), "every @FIELD@ was filled in"


def test_refusals_are_entries_naming_caller_and_error(models: Models) -> None:
    ensure_users()
    name, _ = models.run("refused")
    gpusched("stop", name)
    assert gpusched("thaw", name, check=False).returncode == 1  # InvalidState: a stopped model
    assert not call_as(BOB, "Freeze", "s", name).ok  # AccessDenied by polkit

    def refusals() -> dict[str, dict[str, Any]]:
        found = {e["GPUSCHED_ERROR"]: e for e in entries(f"MESSAGE_ID={REFUSAL_ID}", f"GPUSCHED_MODEL={name}")}
        return found if len(found) == 2 else {}

    found = wait_until("two refusal entries", refusals)
    invalid = found["org.gpusched1.Error.InvalidState"]
    assert (invalid["GPUSCHED_EVENT"], invalid["GPUSCHED_METHOD"], invalid["GPUSCHED_CALLER_UID"]) == (
        "refusal",
        "Thaw",
        "0",
    )
    assert invalid["PRIORITY"] == "5" and invalid["OBJECT_SYSTEMD_UNIT"] == model_unit(name)
    denied = found["org.freedesktop.DBus.Error.AccessDenied"]
    assert denied["GPUSCHED_CALLER_UID"] == str(uid_of(BOB)) and denied["PRIORITY"] == "4"
    assert denied["MESSAGE"].startswith(f"Freeze of {name} refused for uid {uid_of(BOB)}: not authorized")
