"""System tests: the installed gpuschedd under a real systemd, system bus, polkitd and journald.

They run only inside tools/sandbox.sh's guest (`make system-tests`), because the session fixture installs the project
into the root filesystem — there an overlay in RAM, anywhere else the real system. The shipped files are installed by
`make install`, exactly as a package would; nothing here keeps copies of them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import sysutil
from fakegpu_sys import FakeModels, fake_gpu_daemon
from sysutil import Models, run, wait_until

from gpuschedd.testing.fakegpu import FakeGpuDir

HERE = Path(__file__).resolve().parent
ALLOWED = sysutil.ALLOWED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sysutil.gate_to_sandbox(items, HERE, "system tests (make system-tests)")


def journal(*args: str, since: float | None = None) -> str:
    argv = ["journalctl", "--no-pager", "-o", "short-precise", *args]
    if since is not None:
        argv.append(f"--since=@{since:.6f}")
    return run(*argv, check=False).stdout


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Like power-profiles-daemon's tests: the daemon's log is printed only for a test that failed."""
    outcome = yield
    report = outcome.get_result()
    started = getattr(item, "_gpusched_started", None)
    if report.failed and started is not None and ALLOWED:
        text = journal("-u", "gpuschedd.service", "-u", "gpusched-model@*", since=started - 0.05)
        report.sections.append(("journal of gpuschedd and the models during this test", text))


@pytest.fixture(autouse=True)
def _mark_start(request: pytest.FixtureRequest) -> None:
    request.node._gpusched_started = time.time()


@pytest.fixture(scope="session", autouse=True)
def daemon() -> Iterator[None]:
    """Install the project into the guest as a package would, then start gpuschedd.service and wait for its name."""
    if not ALLOWED:
        yield
        return
    sysutil.install_project()
    started = time.time()
    start = run("systemctl", "start", "gpuschedd.service", check=False, timeout=90)
    if start.returncode != 0 or not wait_until_owner():
        pytest.exit(
            f"gpuschedd did not start:\n{start.stderr}\n"
            + run("systemctl", "status", "--no-pager", "gpuschedd.service", check=False).stdout
            + journal("-u", "gpuschedd.service", since=started - 1),
            returncode=1,
        )
    sysutil.ensure_workdir()
    yield


def wait_until_owner(timeout: float = 10) -> bool:
    try:
        wait_until("org.gpusched1 to have an owner", sysutil.name_has_owner, timeout)
    except AssertionError:
        return False
    return True


def model_prefix(request: pytest.FixtureRequest) -> str:
    """Model names from the test's name: unique per test, and easy to find in the journal."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", request.node.name.removeprefix("test_"))[:40].strip("-.")


@pytest.fixture
def models(request: pytest.FixtureRequest) -> Iterator[Models]:
    factory = Models(model_prefix(request))
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGpuDir]:
    """The installed daemon on the fake GPU, for the tests of one module (fakegpu_sys.py)."""
    with fake_gpu_daemon() as fake:
        yield fake


@pytest.fixture
def fmodels(request: pytest.FixtureRequest, fake: FakeGpuDir) -> Iterator[FakeModels]:
    factory = FakeModels(model_prefix(request), fake)
    yield factory
    factory.cleanup()
