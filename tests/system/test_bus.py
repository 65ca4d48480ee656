"""The D-Bus surface as other programs see it: typed error names, introspection, object paths, signals, and the
manager's properties. Callers branch on error names, so every client tool must see the same name."""

from __future__ import annotations

import subprocess
import time

import dbus
import pytest
from sysutil import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    MODEL_IFACE,
    Models,
    get_property,
    gpusched,
    manager_call,
    model_path,
    model_property,
    run,
    wait_until,
)

NO_SUCH_MODEL = "org.gpusched1.Error.NoSuchModel"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--")


@pytest.mark.parametrize("method", ["Freeze", "Thaw", "Stop", "Forget", "GetModel"])
def test_no_such_model_via_busctl(method: str) -> None:
    proc = manager_call(method, "s", "nosuch", check=False)
    assert proc.returncode != 0
    # busctl prints only the message; --verbose... does not print the name either, so ask for it through gdbus below
    assert proc.stderr.strip()


@pytest.mark.parametrize("method", ["Freeze", "Thaw", "Stop", "Forget", "GetModel"])
def test_no_such_model_via_gdbus(method: str) -> None:
    proc = run(
        "gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
        "--method", f"{MANAGER_IFACE}.{method}", "nosuch", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"GDBus.Error:{NO_SUCH_MODEL}:" in proc.stderr


def test_no_such_model_via_dbus_python() -> None:
    manager = dbus.Interface(dbus.SystemBus().get_object(BUS_NAME, MANAGER_PATH), MANAGER_IFACE)
    with pytest.raises(dbus.DBusException) as info:
        manager.Freeze("nosuch")
    assert info.value.get_dbus_name() == NO_SUCH_MODEL
    assert "Traceback" not in info.value.get_dbus_message()


@pytest.mark.parametrize("verb", ["freeze", "thaw", "stop", "forget"])
def test_no_such_model_via_cli(verb: str) -> None:
    proc = gpusched(verb, "nosuch", check=False)
    assert proc.returncode == 4
    assert proc.stderr.strip() and "Traceback" not in proc.stderr


def test_cli_usage_error_is_exit_2() -> None:
    assert gpusched("frobnicate", check=False).returncode == 2
    assert gpusched("run", "--name", "x", check=False).returncode == 2  # no command


def test_invalid_name_is_invalid_args() -> None:
    proc = run(
        "gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
        "--method", f"{MANAGER_IFACE}.Run", "../etc", "['/bin/true']", "{}", check=False,
    )  # fmt: skip
    assert "org.freedesktop.DBus.Error.InvalidArgs" in proc.stderr


def test_manager_properties() -> None:
    assert get_property(MANAGER_PATH, MANAGER_IFACE, "Version")
    assert get_property(MANAGER_PATH, MANAGER_IFACE, "CheckpointBackend") == "none"  # no GPU in the sandbox
    assert get_property(MANAGER_PATH, MANAGER_IFACE, "RamBudgetBytes") > 0
    assert get_property(MANAGER_PATH, MANAGER_IFACE, "RamFrozenBytes") >= 0
    assert get_property(MANAGER_PATH, MANAGER_IFACE, "Gpus") == []


def test_introspect_model_object(models: Models) -> None:
    name, _ = models.run("intro")
    out = run("busctl", "--system", "introspect", "--no-pager", BUS_NAME, model_path(name)).stdout
    assert MODEL_IFACE in out
    for member in (".State", ".Pids", ".VramBytes", ".SnapshotBytes", ".Freeze", ".Thaw", ".Stop"):
        assert member in out, f"{member} missing from:\n{out}"
    for line in out.splitlines():
        if line.startswith(".State "):
            assert '"running"' in line
    tree = run("busctl", "--system", "tree", "--list", "--no-pager", BUS_NAME).stdout
    assert model_path(name) in tree.split()


def test_get_model_returns_the_escaped_path(models: Models) -> None:
    """systemd's bus_label_escape: a leading digit and every '-' or '.' become _xx."""
    name, _ = models.run("7b-chat.v2")  # PREFIX-7b-chat.v2: '-' and '.' inside
    path = model_path(name)
    assert "-" not in path and "." not in path
    reply = run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetModel", "s", name).stdout
    assert reply.strip() == f'o "{path}"'
    assert model_property(name, "Name") == name


def test_leading_digit_is_escaped(models: Models) -> None:
    name = "9lives"
    models.names.append(name)
    counter = models.counter(name)
    gpusched("run", "--name", name, "--", *counter.argv())
    assert model_path(name) == "/org/gpusched1/model/_39lives"
    assert model_property(name, "State") == "running"


class Monitor:
    """`gdbus monitor` on the daemon's name: records every signal while a test acts."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["gdbus", "monitor", "--system", "--dest", BUS_NAME],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(0.3)  # gdbus subscribes after connecting; there is nothing to poll for

    def stop(self) -> str:
        time.sleep(0.2)
        self.proc.terminate()
        return self.proc.communicate(timeout=5)[0]


def test_signals(models: Models) -> None:
    monitor = Monitor()
    try:
        name, _ = models.run("sig")
        gpusched("freeze", name)
        gpusched("thaw", name)
        gpusched("stop", name)
        wait_until("State stopped", lambda: model_property(name, "State") == "stopped")
        gpusched("forget", name)
    finally:
        out = monitor.stop()
    path = model_path(name)
    assert f"{MANAGER_PATH}: {MANAGER_IFACE}.ModelNew ('{name}', objectpath '{path}')" in out, out
    assert f"{MANAGER_PATH}: {MANAGER_IFACE}.ModelRemoved ('{name}', objectpath '{path}')" in out, out
    changes = [line for line in out.splitlines() if line.startswith(f"{path}: org.freedesktop.DBus.Properties")]
    for state in ("frozen", "running", "stopped"):
        assert any(f"'State': <'{state}'>" in line for line in changes), f"no State={state} in:\n{out}"


def test_reading_is_open_to_everyone(models: Models) -> None:
    """The bus policy lets any user read; `nobody` lists the models and reads a property."""
    name, _ = models.run("open")
    out = run(*AS_NOBODY, "busctl", "--system", "get-property", BUS_NAME, model_path(name), MODEL_IFACE, "State").stdout
    assert out.strip() == 's "running"'
    out = run(*AS_NOBODY, "gpusched", "list").stdout
    assert name in out


def test_get_all_with_an_empty_interface_answers_every_property(models: Models) -> None:
    """Generic tools (the D-Bus specification allows it) ask GetAll(""): the answer is the object's properties,
    the same as GetAll of its interface, for the manager and for a model, and for any user."""
    name, _ = models.run("getall")
    for path, iface, prop in ((MANAGER_PATH, MANAGER_IFACE, "Version"), (model_path(name), MODEL_IFACE, "State")):
        bus = dbus.SystemBus()
        props = dbus.Interface(bus.get_object(BUS_NAME, path), "org.freedesktop.DBus.Properties")
        assert set(props.GetAll("")) == set(props.GetAll(iface)) and prop in props.GetAll("")
        out = run(
            *AS_NOBODY,
            "busctl",
            "--system",
            "call",
            BUS_NAME,
            path,
            "org.freedesktop.DBus.Properties",
            "GetAll",
            "s",
            "",
        ).stdout
        assert out.startswith("a{sv} ") and f'"{prop}"' in out
    with pytest.raises(dbus.DBusException) as e:
        props.GetAll("org.nope")
    assert e.value.get_dbus_name() == "org.freedesktop.DBus.Error.UnknownInterface", "a wrong interface is refused"


def test_only_root_may_own_the_name() -> None:
    proc = run(
        *AS_NOBODY, "gdbus", "call", "--system", "--dest", "org.freedesktop.DBus", "--object-path",
        "/org/freedesktop/DBus", "--method", "org.freedesktop.DBus.RequestName", BUS_NAME, "4", check=False,
    )  # fmt: skip
    assert "org.freedesktop.DBus.Error.AccessDenied" in proc.stderr
