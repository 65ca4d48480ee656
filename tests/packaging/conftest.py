"""Package tests: the .deb built, installed, upgraded under a frozen model, removed and purged in a fresh systemd; the
.rpm built, checked for Fedora's paths and linted (`make package-tests`, part of `make check`).

They install into / and so run only inside tools/sandbox.sh's guest, where / is an overlay in RAM, and in a guest of
their own: the system tests' guest has the project installed by `make install`, which is not a fresh machine.

The tests of a module are steps of one story (install, then use, then upgrade...): once a step fails, the later ones
are reported as skipped instead of failing for the same reason.
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "system"))

import sysutil  # noqa: E402  (tests/system's helpers, on the path only from here)

ALLOWED = sysutil.ALLOWED
_failed_step: dict[Path, str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sysutil.gate_to_sandbox(items, HERE, "package tests (make package-tests)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    failed = _failed_step.get(item.path)
    if failed is not None:
        pytest.skip(f"an earlier step failed: {failed}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and HERE in item.path.parents:
        _failed_step.setdefault(item.path, item.name)
        if ALLOWED:
            text = sysutil.run(
                "journalctl", "--no-pager", "-o", "short-precise", "-n", "60",
                "-u", "gpuschedd.service", "-u", "gpusched-model@*", check=False,
            ).stdout  # fmt: skip
            report.sections.append(("journal of gpuschedd and the models (last 60 lines)", text))
