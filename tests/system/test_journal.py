"""Every state change is one structured journal entry, found by model, by event kind, and with the model's own unit
(`journalctl -u gpusched-model@NAME`, through OBJECT_SYSTEMD_UNIT=), as admins look for them."""

from __future__ import annotations

import json
import re
from typing import Any

from sysutil import Models, gpusched, model_unit, run, wait_until


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
