"""Wake on first connection: a model run with Port=/BackendPort= gets gpusched-wake@NAME.socket (systemd owns the
public port) and its proxy; a real TCP client connecting to a frozen model's public port thaws it and gets its
first byte. Prints connect -> first byte for a frozen model and for a cold start (docs/configuration.md)."""

from __future__ import annotations

import socket
import time

from sysutil import GUEST_PYTHON, REPO, Models, manager_call, model_property, run, unit_property, wait_until

ECHO = REPO / "examples" / "echo_server.py"
PUBLIC, BACKEND = 47811, 47812  # 127.0.0.1 only


def run_with_port(name: str, port: int, backend: int) -> None:
    manager_call(
        "Run", "sasa{sv}", name, "3", GUEST_PYTHON, str(ECHO), str(backend),
        "3", "Port", "q", str(port), "BackendPort", "q", str(backend), "ListenAddress", "s", "127.0.0.1",
    )  # fmt: skip


def first_byte(port: int, timeout: float = 30) -> tuple[float, bytes]:
    """Connect to 127.0.0.1:port; seconds from the connect to the first byte received, and the greeting line."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        first = sock.recv(1)
        elapsed = time.monotonic() - t0
        rest = b""
        while not rest.endswith(b"\n"):
            rest += sock.recv(100)
        sock.sendall(b"ping\n")
        echoed = b""
        while not echoed.endswith(b"\n"):
            echoed += sock.recv(100)
        assert echoed == b"ping\n"
    return elapsed, first + rest


def test_connection_thaws_a_frozen_model(models: Models) -> None:
    name = models.name("wake")
    models.names.append(name)
    t0 = time.monotonic()
    run_with_port(name, PUBLIC, BACKEND)
    # cold start: the client connects at once; the proxy waits for the server to listen
    cold, greeting = first_byte(PUBLIC)
    cold_total = time.monotonic() - t0
    assert greeting.startswith(b"hello from ")
    assert unit_property(f"gpusched-wake@{name}.socket", "ActiveState") == "active"

    frozen = []
    for _ in range(5):
        manager_call("Freeze", "s", name)
        assert model_property(name, "State") == "frozen"
        elapsed, again = first_byte(PUBLIC)
        assert again == greeting  # the same process: thawed, not restarted
        assert model_property(name, "State") == "running"
        frozen.append(elapsed)
    warm = min(first_byte(PUBLIC)[0] for _ in range(5))
    print(
        f"\nwake: connect->first byte: cold start {cold * 1000:.1f} ms (Run->first byte {cold_total * 1000:.1f} ms), "
        f"frozen {min(frozen) * 1000:.1f}-{max(frozen) * 1000:.1f} ms, running {warm * 1000:.2f} ms"
    )

    manager_call("Stop", "s", name)
    wait_until("the wake units are gone", lambda: wake_socket_gone(name))
    connect = f"import socket; socket.create_connection(('127.0.0.1', {PUBLIC}), 2)"
    refused = run(GUEST_PYTHON, "-c", connect, check=False)
    assert refused.returncode != 0


def wake_socket_gone(name: str) -> bool:
    return unit_property(f"gpusched-wake@{name}.socket", "LoadState") == "not-found" or unit_property(
        f"gpusched-wake@{name}.socket", "ActiveState"
    ) in ("inactive", "failed")


def test_a_model_that_dies_closes_its_public_port(models: Models) -> None:
    """The model's unit ends by itself (killed here): the model is failed, and its port goes with it instead of
    keeping clients waiting for a model that will not run again."""
    name = models.name("wakedie")
    models.names.append(name)
    port, backend = PUBLIC + 3, BACKEND + 3
    run_with_port(name, port, backend)
    first_byte(port)
    run("systemctl", "kill", "--signal=SIGKILL", f"gpusched-model@{name}.service")
    wait_until("the model is failed", lambda: model_property(name, "State") == "failed")
    wait_until("the wake units are gone", lambda: wake_socket_gone(name))
    assert unit_property(f"gpusched-wake@{name}.service", "ActiveState") in ("inactive", "failed", "")
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
    assert run(GUEST_PYTHON, "-c", connect, check=False).returncode != 0


def test_port_options_are_checked(models: Models) -> None:
    name = models.name("wakebad")
    out = manager_call("Run", "sasa{sv}", name, "1", "/bin/true", "1", "Port", "q", "47813", check=False)
    assert out.returncode != 0 and "BackendPort" in out.stderr
