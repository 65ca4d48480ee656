"""The model catalog (issue 17.1) through the installed daemon: files in /etc/gpusched/models.d, listed stopped,
started by name as root and as the unprivileged users alice (in gpusched) and bob (not), with and without
control-catalog; reload (systemctl, gpusched, SIGHUP) adding and removing; a bad file logged with file:line at
error priority while the rest load; Preload= at daemon start; a running catalog model taken over by a restart."""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakegpu_sys import daemon_pid, restart_daemon
from secutil import ALICE, BOB, call_as, calls_as, ensure_users, manager, proc_ids, run_as, uid_of, user_counter
from sysutil import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    MODEL_IFACE,
    WORKDIR,
    Counter,
    gpusched,
    list_models,
    model_path,
    model_property,
    model_unit,
    run,
    unit_property,
    wait_until,
)
from test_security import TEST_RULES, _pkcheck, assert_denied, test_rules  # noqa: F401 (test_rules: a fixture)

CATALOG = Path("/etc/gpusched/models.d")
VENDOR = Path("/usr/lib/gpusched/models.d")
MODEL_EXISTS = "org.gpusched1.Error.ModelExists"
NO_SUCH_MODEL = "org.gpusched1.Error.NoSuchModel"


@pytest.fixture(scope="module", autouse=True)
def users() -> None:
    ensure_users()


class Catalog:
    """Catalog files a test writes (counter models, as a user), removed with their models afterwards."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.files: list[Path] = []

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def counter(self, name: str, user: str) -> Counter:
        return Counter(WORKDIR / f"{name}.count") if user == "root" else user_counter(user, name)

    def write(self, suffix: str, user: str = "root", extra: str = "", directory: Path = CATALOG) -> tuple[str, Counter]:
        name = self.name(suffix)
        counter = self.counter(name, user)
        argv = shlex.join(counter.argv())
        path = directory / f"{name}.conf"
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# test model\n[Model]\nCommand={argv}\nUser={user}\n{extra}")
        path.chmod(0o644)
        self.files.append(path)
        return name, counter

    def cleanup(self) -> None:
        for path in self.files:
            name = path.name.removesuffix(".conf")
            gpusched("stop", name, check=False)
            path.unlink(missing_ok=True)
        gpusched("reload", check=False)
        for path in self.files:
            name = path.name.removesuffix(".conf")
            run("systemctl", "stop", model_unit(name), check=False)
            run("systemctl", "reset-failed", model_unit(name), check=False)
            gpusched("forget", name, check=False)


@pytest.fixture
def catalog(request: pytest.FixtureRequest) -> Iterator[Catalog]:
    prefix = "cat-" + request.node.name.removeprefix("test_")[:24].replace("_", "-").strip("-")
    factory = Catalog(prefix)
    yield factory
    factory.cleanup()


def state(name: str) -> str | None:
    row = list_models().get(name)
    return row["state"] if row else None


def main_pid(name: str) -> int:
    return int(model_property(name, "MainPid"))


def test_listed_stopped_then_started_by_name_as_its_user(catalog: Catalog) -> None:
    name, counter = catalog.write("web", ALICE, "BackendPort=9001\nAliases=web-alias other-alias\n")
    gpusched("reload")
    assert state(name) == "stopped"
    assert model_property(name, "Catalog") is True
    assert model_property(name, "Aliases") == ["web-alias", "other-alias"]
    assert model_property(name, "BackendPort") == 9001
    assert model_property(name, "Owner") == uid_of(ALICE) and model_property(name, "MainPid") == 0
    out = gpusched("start", name).stdout
    assert f"Started {name} as unit {model_unit(name)}" in out
    counter.assert_moving()
    assert state(name) == "running" and unit_property(model_unit(name), "User") == ALICE
    assert proc_ids(main_pid(name))["Uid"] == [uid_of(ALICE)] * 4
    assert model_property(name, "Catalog") is True and model_property(name, "BackendPort") == 9001
    # already running: Start returns its path and does nothing
    pid = main_pid(name)
    assert gpusched_call("Start", "s", name) == f'o "{model_path(name)}"' and main_pid(name) == pid
    status = gpusched("status", name).stdout
    assert "Catalog: yes" in status and "also web-alias other-alias" in status and "127.0.0.1:9001" in status
    # stopped, it stays listed and starts again
    gpusched("stop", name)
    assert state(name) == "stopped" and model_property(name, "Catalog") is True
    counter.assert_still()
    gpusched("start", name)
    counter.assert_moving()


def gpusched_call(method: str, signature: str = "", *args: str) -> str:
    argv = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, method]
    return run(*argv, *([signature, *args] if signature else [])).stdout.strip()


def test_busctl_start_on_the_manager_and_on_the_model_object(catalog: Catalog) -> None:
    name, counter = catalog.write("busctl")
    run("systemctl", "reload", "gpuschedd")  # ExecReload= calls Reload and waits for it
    assert state(name) == "stopped"
    run("busctl", "--system", "call", BUS_NAME, model_path(name), MODEL_IFACE, "Start")
    counter.assert_moving()
    gpusched("stop", name)
    assert gpusched_call("Start", "s", name) == f'o "{model_path(name)}"'
    counter.assert_moving()
    unknown = run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Start", "s", "no-such-x",
                  check=False)  # fmt: skip
    assert unknown.returncode != 0 and "no model named" in unknown.stderr


@pytest.mark.usefixtures("test_rules")
def test_who_may_start_a_catalog_model(catalog: Catalog) -> None:
    """alice (in gpusched) starts her own catalog model with control; not bob's (control-catalog); no Run over a
    catalog name, even her own. bob (not in gpusched) may not start even his own. Given control-catalog by a rule,
    bob starts, freezes and thaws alice's model, which runs as alice, never as bob; he still may not stop it."""
    hers, her_counter = catalog.write("hers", ALICE)
    his, his_counter = catalog.write("his", BOB)
    gpusched("reload")
    run_as(ALICE, "gpusched", "--no-ask-password", "start", hers)
    her_counter.assert_moving()
    assert proc_ids(main_pid(hers))["Uid"] == [uid_of(ALICE)] * 4
    gpusched("stop", hers)
    denied = calls_as(
        ALICE,
        [manager("Start", "s", his), manager("Run", "sasa{sv}", hers, ["/bin/sleep", "100"], {})],
    )
    assert_denied(denied[0])
    assert not denied[1].ok and denied[1].error == MODEL_EXISTS, str(denied[1])
    assert_denied(call_as(BOB, "Start", "s", his))
    assert_denied(call_as(BOB, "Start", "s", hers))
    assert state(his) == "stopped" and state(hers) == "stopped"
    # a Start of a model someone ran is NoSuchModel, whoever asks
    assert call_as(BOB, "Start", "s", "not-in-the-catalog").error == NO_SUCH_MODEL
    TEST_RULES.write_text(
        "polkit.addRule(function(action, subject) {\n"
        f'    if (action.id == "org.gpusched1.control-catalog" && subject.user == "{BOB}") {{\n'
        "        return polkit.Result.YES;\n"
        "    }\n"
        "});\n"
    )
    wait_until(
        "polkitd to load the test rules",
        lambda: _pkcheck(BOB, "org.gpusched1.control-catalog", {"model": hers, "verb": "start"}) == 0,
        timeout=10,
    )
    replies = calls_as(BOB, [manager("Start", "s", hers), manager("Freeze", "s", hers)])
    assert all(r.ok for r in replies), [str(r) for r in replies]
    assert state(hers) == "frozen"
    assert proc_ids(main_pid(hers))["Uid"] == [uid_of(ALICE)] * 4
    assert unit_property(model_unit(hers), "User") == ALICE
    replies = calls_as(BOB, [manager("Thaw", "s", hers), manager("Stop", "s", hers), manager("Forget", "s", hers)])
    assert replies[0].ok, str(replies[0])
    assert_denied(replies[1])
    assert_denied(replies[2])
    her_counter.assert_moving()
    assert not his_counter.path.exists()


def test_reload_adds_updates_and_removes_and_a_bad_file_is_one_error(catalog: Catalog) -> None:
    first, _ = catalog.write("first")
    gpusched("reload")
    assert state(first) == "stopped"
    since = time.time()
    second, counter = catalog.write("second", extra="Description=the second\n")
    bad = CATALOG / f"{catalog.name('bad')}.conf"
    bad.write_text("[Model]\nCommand=/bin/true\nUser=root\nGpus=zero\n")
    catalog.files.append(bad)
    bad.chmod(0o644)
    (CATALOG / f"{first}.conf").unlink()
    os.kill(daemon_pid(), signal.SIGHUP)  # as `systemctl kill -s HUP gpuschedd`
    wait_until("the catalog to be read again", lambda: state(second) == "stopped" and state(first) is None)
    assert state(catalog.name("bad")) is None
    errors = run(
        "journalctl", "--no-pager", "-u", "gpuschedd", "-p", "err", "-o", "cat", f"--since=@{since:.6f}"
    ).stdout
    assert f"{bad}:4: Gpus=zero: GPUs are named" in errors and "the file is ignored" in errors, errors
    assert errors.count(str(bad)) == 1 and second not in errors
    gpusched("start", second)
    counter.assert_moving()
    assert "the second" in unit_property(model_unit(second), "Description")


def test_vendor_file_masked_by_etc_and_an_unsafe_file_refused(catalog: Catalog) -> None:
    """/etc masks /usr/lib (a /dev/null symlink masks without replacing); a file another user owns is refused."""
    vendor, _ = catalog.write("vendor", directory=VENDOR)
    masked, _ = catalog.write("masked", directory=VENDOR)
    catalog.write("vendor", ALICE)  # the admin's file of the same name
    mask = CATALOG / f"{masked}.conf"
    mask.symlink_to("/dev/null")
    catalog.files.append(mask)
    foreign, _ = catalog.write("foreign")
    os.chown(CATALOG / f"{foreign}.conf", uid_of(ALICE), -1)
    gpusched("reload")
    assert state(vendor) == "stopped" and model_property(vendor, "Owner") == uid_of(ALICE)
    assert state(masked) is None and state(foreign) is None


def test_preload_at_daemon_start_and_a_running_catalog_model_taken_over(catalog: Catalog) -> None:
    warm, warm_counter = catalog.write("warm", extra="Preload=yes\nAliases=warm-alias\n")
    cold, _ = catalog.write("cold")
    gpusched("reload")
    assert state(warm) == "stopped"  # a reload starts nothing
    restart_daemon()
    wait_until(f"{warm} preloaded", lambda: state(warm) == "running")
    warm_counter.assert_moving()
    assert state(cold) == "stopped"
    pid = main_pid(warm)
    restart_daemon()
    assert state(warm) == "running" and main_pid(warm) == pid  # taken over, not started again
    assert model_property(warm, "Catalog") is True and model_property(warm, "Aliases") == ["warm-alias"]
    warm_counter.assert_moving()
