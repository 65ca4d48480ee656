"""What `systemctl status gpuschedd` and `gpusched status` tell a person: the daemon's STATUS= line (sd_notify) and
the CLI's systemctl-like view of models, GPUs and host RAM."""

from __future__ import annotations

from sysutil import Models, gpusched, list_models, run, unit_property, wait_until

STATES = ("running", "freezing", "frozen", "thawing", "stopped", "failed")


def expected_status() -> str:
    """The status line the daemon should show, from what ListModels says (other tests' models included)."""
    states = [m["state"] for m in list_models().values()]
    return ", ".join(f"{states.count(s)} {s}" for s in STATES if s in states) or "no models"


def test_systemctl_status_shows_model_counts(models: Models) -> None:
    models.run("a")
    frozen, _ = models.run("b")
    gpusched("freeze", frozen)
    expected = expected_status()
    assert "1 frozen" in expected
    wait_until(f"StatusText={expected!r}", lambda: unit_property("gpuschedd.service", "StatusText") == expected)
    out = run("systemctl", "status", "--no-pager", "gpuschedd.service").stdout
    assert f'Status: "{expected}"' in out
    gpusched("thaw", frozen)
    expected = expected_status()
    assert "frozen" not in expected
    wait_until(f"StatusText={expected!r}", lambda: unit_property("gpuschedd.service", "StatusText") == expected)
