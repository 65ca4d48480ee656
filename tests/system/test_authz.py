"""What a caller can make the daemon do to others (issue 15.3, 15.4, 15.9), through the installed daemon as the
unprivileged users: alice (in gpusched: may run and control her own models), bob (not), root.

- An eviction (EvictOnThaw=yes) or a stop for room in the RAM budget (RamBudgetAction=stop-oldest) taken for
  alice's request touches only alice's models, never bob's (run by root as bob) or root's, even of lower priority.
- A Priority above MaxUserPriority= needs `manage`.
- A public port below 1024, or a ListenAddress off loopback, needs `manage`; alice's port is on loopback by default.
- The wake proxy hands a connection only to a server of the model's own user.
- AdoptProcesses of a process whose uids differ (a setuid program) needs `manage`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakegpu_sys import CONF, DROPIN, FAKE_DIR, GPU0, MIB, FakeModel, FakeModels, journal_entries, restart_daemon
from secutil import ALICE, BOB, as_user_argv, call_as, ensure_users, run_as, uid_of, user_workdir, variant
from sysutil import GUEST_PYTHON, REPO, gpusched, list_models, run, unit_property, wait_until
from test_security import TEST_RULES, _pkcheck, test_rules  # noqa: F401 (test_rules: a fixture)

from gpuschedd.testing.fakegpu import FakeGpuTelemetry

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
FAKE_MODEL = REPO / "tests" / "fakecuda" / "fake_model.py"
ECHO = REPO / "examples" / "echo_server.py"
UMASK_DROPIN = DROPIN.parent / "60-authz-test.conf"


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    ensure_users()


def fake_argv(user: str, name: str, vram: int = 64 * MIB) -> list[str]:
    counter = user_workdir(user) / f"{name}.count"
    return [GUEST_PYTHON, str(FAKE_MODEL), "--dir", str(FAKE_DIR), "--vram", str(vram), "--gpu", GPU0,
            "--counter", str(counter), "--procs", "1"]  # fmt: skip


def share_fake_gpu() -> None:
    """The fake driver keeps its state in files every CUDA process reads and writes: let the users' models use them
    too (the real driver needs no such thing). The daemon writes them with the umask of its unit: a drop-in opens
    it up for the test (UMASK_DROPIN)."""
    for sub in ("ctx", "state", "alloc", "fail", "busy", "broken", "req", "ack", "delay"):
        (FAKE_DIR / sub).mkdir(exist_ok=True)
        os.chmod(FAKE_DIR / sub, 0o777)
    for name in ("lock", "log"):
        (FAKE_DIR / name).touch()
        os.chmod(FAKE_DIR / name, 0o666)


def held(fmodels: FakeModels, model: FakeModel) -> None:
    wait_until(f"{model.name}'s CUDA process", lambda: len(model.cuda_pids(fmodels.fake)) == 1)
    wait_until(f"{model.name}'s VRAM seen", lambda: list_models()[model.name]["vram_bytes"] > 0)


def root_runs(fmodels: FakeModels, suffix: str, *options: str, user: str = "root") -> FakeModel:
    model = FakeModel(f"{fmodels.prefix}-{suffix}", 1)
    fmodels.started.append(model)
    as_user = ["--user", user] if user != "root" else []
    gpusched("run", "--name", model.name, *as_user, *options, "--", *fake_argv(user, model.name))
    held(fmodels, model)
    return model


def alice_runs(fmodels: FakeModels, suffix: str, *options: str) -> tuple[FakeModel, str]:
    """Alice runs a fake model; returns it and the CLI's error ("" when it runs)."""
    model = FakeModel(f"{fmodels.prefix}-{suffix}", 1)
    fmodels.started.append(model)
    argv = ["gpusched", "--no-ask-password", "run", "--name", model.name, *options, "--", *fake_argv(ALICE, model.name)]
    reply = run_as(ALICE, *argv, check=False)
    if reply.returncode:
        return model, reply.stderr or "failed"
    held(fmodels, model)
    return model, ""


def states(*models: FakeModel) -> list[str]:
    table = list_models()
    return [table[m.name]["state"] for m in models]


@pytest.fixture
def policies_on() -> Iterator[None]:
    saved = CONF.read_text()
    CONF.write_text(saved + "EvictOnThaw=yes\nRamBudgetAction=stop-oldest\nRamBudget=200M\n")
    UMASK_DROPIN.write_text("[Service]\nUMask=0000\n")
    run("systemctl", "daemon-reload")
    restart_daemon()
    share_fake_gpu()
    try:
        yield
    finally:
        CONF.write_text(saved)
        UMASK_DROPIN.unlink()
        run("systemctl", "daemon-reload")
        restart_daemon()


def test_automatic_decisions_for_alice_touch_only_her_models(fmodels: FakeModels, policies_on: None) -> None:
    roots = root_runs(fmodels, "az-root", "--priority", "-5")
    bobs = root_runs(fmodels, "az-bob", "--priority", "-5", user=BOB)
    assert list_models()[bobs.name]["owner"] == uid_of(BOB)
    low, error = alice_runs(fmodels, "az-low", "--priority", "-1")
    assert not error, error
    free = next(g.free_bytes for g in FakeGpuTelemetry(str(FAKE_DIR)).gpus() if g.uuid == GPU0)
    fmodels.fake.allocate("hog", free - (100 << 20), GPU0)  # 100 MiB free: any one 64 MiB model makes room
    try:
        # Eviction for alice's start: root's and bob's models are of lower priority, yet only hers is frozen.
        new, error = alice_runs(fmodels, "az-new", "--gpus", "0", "--gpu-memory", str(150 << 20))
        assert not error, error
        assert states(roots, bobs, low, new) == ["running", "running", "frozen", "running"]
        [entry] = journal_entries(f"GPUSCHED_MODEL={low.name}", "GPUSCHED_EVENT=freeze")
        assert entry["GPUSCHED_REASON"] == "evicted" and f"requested by uid {uid_of(ALICE)}" in entry["MESSAGE"]
        # Nothing of hers of a priority up to -1 left to evict: refused with the real numbers, theirs untouched.
        more, error = alice_runs(fmodels, "az-more", "--gpus", "0", "--gpu-memory", str(150 << 20), "--priority", "-1")
        assert "InsufficientGpuMemory" in error and "needs 157286400 bytes free on GPU 0" in error, error
        assert more.name not in list_models()
        assert states(roots, bobs, low, new) == ["running", "running", "frozen", "running"]
    finally:
        fmodels.fake.free("hog")
    # stop-oldest for alice's freeze: root's and bob's models were frozen longest ago, yet only hers is stopped.
    assert run_as(ALICE, "gpusched", "--no-ask-password", "thaw", low.name, check=False).returncode == 0
    gpusched("freeze", roots.name)
    gpusched("freeze", bobs.name)
    assert run_as(ALICE, "gpusched", "--no-ask-password", "freeze", low.name, check=False).returncode == 0
    reply = run_as(ALICE, "gpusched", "--no-ask-password", "freeze", new.name, check=False)  # 4 x 64 MiB > 200M
    assert reply.returncode == 0, reply.stderr
    assert states(roots, bobs, low, new) == ["frozen", "frozen", "stopped", "frozen"]
    [entry] = journal_entries(f"GPUSCHED_MODEL={low.name}", "GPUSCHED_EVENT=stop")
    assert entry["GPUSCHED_REASON"] == "ram-budget" and f"requested by uid {uid_of(ALICE)}" in entry["MESSAGE"]


def test_priority_above_the_cap_needs_manage(fmodels: FakeModels) -> None:
    name = f"{fmodels.prefix}-az-prio"
    fmodels.started.append(FakeModel(name, 1))
    argv = ["/bin/sleep", "60"]
    reply = call_as(ALICE, "Run", "sasa{sv}", name, argv, {"Priority": variant("i", 1)})
    assert reply.error == ACCESS_DENIED and name not in list_models()
    assert call_as(ALICE, "Run", "sasa{sv}", name, argv, {"Priority": variant("i", 0)}).ok
    gpusched("stop", name)
    assert call_as("root", "Run", "sasa{sv}", name, argv, {"Priority": variant("i", 100)}).ok


def wake_options(port: int, backend: int, address: str = "") -> dict[str, list[object]]:
    options = {"Port": variant("q", port), "BackendPort": variant("q", backend)}
    if address:
        options["ListenAddress"] = variant("s", address)
    return options


def test_privileged_ports_and_public_addresses_need_manage(fmodels: FakeModels) -> None:
    name = f"{fmodels.prefix}-az-port"
    fmodels.started.append(FakeModel(name, 1))
    argv = [GUEST_PYTHON, str(ECHO), "47832"]
    for options in (wake_options(80, 47832), wake_options(47831, 47832, "0.0.0.0"), wake_options(47831, 47832, "::")):
        reply = call_as(ALICE, "Run", "sasa{sv}", name, argv, options)
        assert reply.error == ACCESS_DENIED, reply
        assert name not in list_models() and unit_property(f"gpusched-wake@{name}.socket", "LoadState") != "loaded"
    # A high port, no address: loopback only.
    assert call_as(ALICE, "Run", "sasa{sv}", name, argv, wake_options(47831, 47832)).ok
    listen = unit_property(f"gpusched-wake@{name}.socket", "Listen")
    assert "127.0.0.1:47831" in listen, listen


def test_the_wake_proxy_reaches_only_the_models_own_server(fmodels: FakeModels) -> None:
    """Alice's public port names as its backend a port served by bob's process: the connection is not handed over
    (and bob's server sees none); with her own server there, it is."""
    backend, public = 47842, 47841
    bobs = subprocess.Popen(as_user_argv(BOB, GUEST_PYTHON, str(ECHO), str(backend)), stdout=subprocess.DEVNULL)
    try:
        wait_until("bob's server listens", lambda: _connects(backend))
        name = f"{fmodels.prefix}-az-wake"
        fmodels.started.append(FakeModel(name, 1))
        assert call_as(ALICE, "Run", "sasa{sv}", name, ["/bin/sleep", "600"], wake_options(public, backend)).ok
        with socket.create_connection(("127.0.0.1", public), timeout=30) as sock:
            sock.settimeout(30)
            assert sock.recv(100) == b"", "closed without a byte of bob's server"
        gpusched("stop", name)
    finally:
        bobs.kill()
        bobs.wait()
    wait_until("bob's server is gone", lambda: not _connects(backend))
    name = f"{fmodels.prefix}-az-wake2"
    fmodels.started.append(FakeModel(name, 1))
    argv = [GUEST_PYTHON, str(ECHO), str(backend)]
    assert call_as(ALICE, "Run", "sasa{sv}", name, argv, wake_options(public, backend)).ok
    with socket.create_connection(("127.0.0.1", public), timeout=30) as sock:
        assert sock.recv(100).startswith(b"hello from ")


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.usefixtures("test_rules")
def test_adopting_a_process_whose_uids_differ_needs_manage(fmodels: FakeModels) -> None:
    """A process of alice's whose effective uid is bob's (what a setuid program of bob's would be): it holds bob's
    rights, so alice, allowed to adopt by an admin's rule, may not make it her model; her plain process she may."""
    TEST_RULES.write_text(
        "polkit.addRule(function(action, subject) {\n"
        f'    if (action.id == "org.gpusched1.adopt" && subject.user == "{ALICE}") {{ return polkit.Result.YES; }}\n'
        "});\n"
    )
    wait_until("polkitd to load the test rules", lambda: _pkcheck(ALICE, "org.gpusched1.adopt", {}) == 0, timeout=10)
    changed = subprocess.Popen(["setpriv", f"--ruid={ALICE}", f"--euid={BOB}", "--", "sleep", "60"])
    plain = subprocess.Popen(as_user_argv(ALICE, "sleep", "60"))
    try:
        for proc in (changed, plain):
            wait_until("sleep runs", lambda p=proc: Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(b"sleep"))
        name = f"{fmodels.prefix}-az-adopt"
        fmodels.started.append(FakeModel(name, 1))
        reply = call_as(ALICE, "AdoptProcesses", "saua{sv}", name, [changed.pid], {})
        assert reply.error == ACCESS_DENIED and name not in list_models(), reply
        assert unit_property(f"gpusched-adopt-{name}.scope", "ControlGroup") == "", "no scope was started"
        reply = call_as(ALICE, "AdoptProcesses", "saua{sv}", name, [plain.pid], {})
        assert reply.ok, reply
        assert list_models()[name]["owner"] == uid_of(ALICE)
    finally:
        for proc in (changed, plain):
            proc.kill()
            proc.wait()
