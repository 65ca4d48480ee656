"""The Python SDK (gpuschedd.client) against the real daemon, as a program of a user would use it: the installed
package (/usr/lib/gpuschedd/python, what `make install` ships), in a process of its own, as root or as bob."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from secutil import BOB, as_user_argv, ensure_users
from sysutil import GUEST_PYTHON, REPO, TIMEOUT, Counter, Models, gpusched, list_models, model_unit, run, wait_until

SDK_PATH = "/usr/lib/gpuschedd/python"
PRELUDE = """
import asyncio, json, sys
from gpuschedd.client import AsyncGpuSched, GpuSched
from gpuschedd import errors
"""


def sdk(script: str, user: str = "root", timeout: float = 60) -> Any:
    """Run `script` with the installed SDK importable; it prints one JSON document, returned decoded."""
    argv = as_user_argv(user, "env", f"PYTHONPATH={SDK_PATH}", GUEST_PYTHON, "-c", PRELUDE + textwrap.dedent(script))
    return json.loads(run(*argv, timeout=timeout).stdout)


def unstarted(models: Models, suffix: str) -> tuple[str, Counter]:
    """A name and a counter for a model the test starts itself (the fixture still cleans it up)."""
    name = models.name(suffix)
    models.names.append(name)
    return name, models.counter(name)


def test_blocking_api_and_typed_errors(models: Models) -> None:
    name, counter = unstarted(models, "sync")
    out = sdk(
        f"""
        name, argv = {name!r}, {counter.argv()!r}
        out = {{}}
        with GpuSched(interactive=False) as gs:
            out["path"] = gs.run(name, argv, description="from the SDK", environment=["A=1"])
            out["listed"] = [m.state for m in gs.models() if m.name == name]
            with gs.events(timeout=10) as events:
                gs.freeze(name)
                out["signals"] = [next(events).state for _ in range(2)]
            out["frozen"] = gs.state(name)
            out["snapshot"] = gs.model(name)["SnapshotBytes"]
            gs.thaw(name)
            out["manager"] = sorted(gs.status())
            errs = []
            for call in (lambda: gs.freeze("no-such"), lambda: gs.run(name, argv), lambda: gs.run("../x", argv)):
                try:
                    call()
                except errors.GpuschedError as e:
                    errs.append([type(e).__name__, e.dbus_name])
            gs.stop(name)
            try:
                gs.thaw(name)
            except errors.InvalidState as e:
                errs.append([type(e).__name__, e.dbus_name])
            out["errors"] = errs
            out["stopped"] = gs.wait_for_state(name, "stopped", timeout=5)
        print(json.dumps(out))
        """
    )
    assert out["listed"] == ["running"] and out["frozen"] == "frozen" and out["stopped"] == "stopped"
    assert out["signals"] == ["freezing", "frozen"]
    assert {"Version", "Gpus", "RamBudgetBytes", "RamFrozenBytes", "TransparentHugepages"} <= set(out["manager"])
    assert out["errors"] == [
        ["NoSuchModel", "org.gpusched1.Error.NoSuchModel"],
        ["ModelExists", "org.gpusched1.Error.ModelExists"],
        ["InvalidArgs", "org.freedesktop.DBus.Error.InvalidArgs"],
        ["InvalidState", "org.gpusched1.Error.InvalidState"],
    ]
    assert list_models()[name]["state"] == "stopped"


def test_denied_is_a_typed_exception(models: Models) -> None:
    ensure_users()
    name, counter = models.run("bobs-target")
    out = sdk(
        f"""
        with GpuSched(interactive=False) as gs:
            try:
                gs.freeze({name!r})
            except (errors.AccessDenied, errors.InteractiveAuthorizationRequired) as e:
                print(json.dumps([type(e).__name__, e.dbus_name, gs.state({name!r})]))
        """,
        user=BOB,
    )
    assert out[0] in ("AccessDenied", "InteractiveAuthorizationRequired") and out[2] == "running"
    counter.assert_moving()


def test_async_api_follows_events(models: Models) -> None:
    name, counter = unstarted(models, "async")
    out = sdk(
        f"""
        async def main():
            name = {name!r}
            seen = []
            async with AsyncGpuSched(interactive=False) as gs, gs.events() as events:
                await gs.run(name, {counter.argv()!r})
                await gs.freeze(name)
                await gs.thaw(name)
                await gs.stop(name)
                await gs.forget(name)
                while not seen or seen[-1] != ["removed", None]:
                    event = await events.get(timeout={TIMEOUT})
                    if event.name == name and (event.kind != "changed" or event.state):
                        seen.append([event.kind, event.state])
            return seen
        print(json.dumps(asyncio.run(main())))
        """
    )
    assert out == [
        ["new", None],
        ["changed", "freezing"],
        ["changed", "frozen"],
        ["changed", "thawing"],
        ["changed", "running"],
        ["changed", "stopped"],
        ["removed", None],
    ]
    assert name not in list_models()


def test_wait_for_a_model_that_ends_by_itself(models: Models) -> None:
    name, _ = models.run("ends", argv=["/bin/sh", "-c", "sleep 0.5; exit 3"])
    out = sdk(
        f"""
        with GpuSched() as gs:
            print(json.dumps(gs.wait_for_state({name!r}, ["stopped", "failed"], timeout=10)))
        """
    )
    assert out == "failed"


def test_the_readmes_rl_loop_runs(models: Models) -> None:
    """examples/rl_loop.py, the README's loop, for three steps with two counter models: each step swaps the
    reward model in and the policy back, and each of them got to run."""
    prefix = models.name("rl")
    models.names += [f"{prefix}-policy", f"{prefix}-reward"]
    policy, reward = models.counter(f"{prefix}-policy"), models.counter(f"{prefix}-reward")
    proc = run(
        "env", f"PYTHONPATH={SDK_PATH}", GUEST_PYTHON, str(REPO / "examples" / "rl_loop.py"),
        "--steps", "3", "--prefix", prefix, "--work", "0.2", "--", *policy.argv(), "--", *reward.argv(),
    )  # fmt: skip
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["step 0", "step 1", "step 2"]
    assert policy.value() > 2 and reward.value() > 2, "both models ran"

    def swap_events() -> list[dict[str, Any]]:
        events = [json.loads(line) for line in gpusched("events", "--json").stdout.splitlines()]
        found = [e for e in events if e["event"] == "swap" and e["model"].startswith(prefix)]
        return found if len(found) == 6 else []

    swaps = wait_until("six swap entries", swap_events)
    ins = [s["model"].removeprefix(prefix + "-") for s in swaps]
    outs = [s["fields"]["GPUSCHED_SWAP_OUT"].removeprefix(prefix + "-") for s in swaps]
    assert ins == ["reward", "policy"] * 3 and outs == ["policy", "reward"] * 3
    assert {list_models()[f"{prefix}-{m}"]["state"] for m in ("policy", "reward")} == {"stopped"}
    assert swaps[0]["unit"] == model_unit(f"{prefix}-reward")
