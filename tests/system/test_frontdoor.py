"""The front door as installed (gpusched-frontdoor.socket and .service, its system user and polkit rule) in front of
the installed daemon and three catalog models (tests/fake_openai.py, each answering with its own name), driven by
the official `openai` client, curl and raw sockets. MaxRunning=1, so every request for another model is a swap."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import secutil
from sysutil import REPO, list_models, log, manager_call, run, wait_until

MODELS_D = Path("/etc/gpusched/models.d")
CONF = Path("/etc/gpusched/frontdoor.conf")
URL = "http://127.0.0.1:8080"
FAKE = REPO / "tests" / "fake_openai.py"
NAMES = ("fd-alpha", "fd-beta", "fd-gamma")
PORTS = {name: 18101 + i for i, name in enumerate(NAMES)}
SOCKET, SERVICE = "gpusched-frontdoor.socket", "gpusched-frontdoor.service"
USER = "gpusched-frontdoor"


def catalog_file(name: str) -> str:
    port = PORTS[name]
    aliases = "\nAliases=gpt-4o-mini" if name == "fd-alpha" else ""
    return (
        f"[Model]\nCommand=/usr/bin/python3 {FAKE} --name {name} --port {port}\nUser={secutil.ALICE}\n"
        f"BackendPort={port}{aliases}\n"
    )


@pytest.fixture(scope="module", autouse=True)
def frontdoor() -> Iterator[None]:
    secutil.ensure_users()
    MODELS_D.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        (MODELS_D / f"{name}.conf").write_text(catalog_file(name))
    manager_call("Reload")
    CONF.write_text("[FrontDoor]\nMaxRunning=1\nRequestTimeoutSec=60\nQueueSize=32\n")
    run("systemctl", "start", SOCKET)
    yield
    run("systemctl", "stop", SERVICE, SOCKET, check=False)
    for name in NAMES:
        manager_call("Stop", "s", name, check=False)
        (MODELS_D / f"{name}.conf").unlink(missing_ok=True)
    manager_call("Reload", check=False)
    CONF.unlink(missing_ok=True)


@pytest.fixture
def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{URL}/v1", api_key="none", max_retries=0, timeout=90)


def ask(client: openai.OpenAI, model: str, **extra: object) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "who?"}], extra_body=extra or None
    )
    return reply.choices[0].message.content or ""


def state(name: str) -> str:
    return list_models()[name]["state"]


def curl(*args: str) -> tuple[int, str]:
    """curl's HTTP status and body."""
    proc = run("curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, check=False, timeout=120)
    body, _, status = proc.stdout.rpartition("\n")
    return int(status or 0), body


def in_flight(model: str) -> float:
    _, text = curl(f"{URL}/metrics")
    for line in text.splitlines():
        if line.startswith(f'gpusched_frontdoor_in_flight{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_routes_by_model_and_alias_and_swaps(client: openai.OpenAI) -> None:
    assert ask(client, "fd-alpha") == "I am fd-alpha."  # stopped: a cold start
    assert ask(client, "gpt-4o-mini") == "I am fd-alpha."
    assert ask(client, "fd-beta") == "I am fd-beta."  # MaxRunning=1: alpha is frozen for it
    assert (state("fd-alpha"), state("fd-beta")) == ("frozen", "running")
    assert ask(client, "fd-alpha") == "I am fd-alpha."  # a swap: beta out, alpha in
    assert (state("fd-alpha"), state("fd-beta")) == ("running", "frozen")
    listed = {m.id for m in client.models.list()}
    assert set(NAMES) <= listed


def test_streaming_passes_through(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fd-gamma",
        messages=[{"role": "user", "content": "who?"}],
        stream=True,
        extra_body={"fake_chunk_delay": 0.05},
    )
    assert [chunk.choices[0].delta.content for chunk in stream] == ["I", " am", " fd-gamma", "."]
    # curl -N shows the events as they come, one per chunk
    status, body = curl("-N", "-H", "Content-Type: application/json", f"{URL}/v1/completions",
                        "-d", json.dumps({"model": "fd-beta", "prompt": "x", "stream": True}))  # fmt: skip
    assert status == 200 and body.count("data: ") == 5 and body.rstrip().endswith("data: [DONE]")


def test_concurrent_clients_and_swaps_under_load(client: openai.OpenAI) -> None:
    """Eight clients, each alternating between the three models with MaxRunning=1: every request is answered, and
    by the model it named."""

    def one_client(i: int) -> list[tuple[str, str]]:
        answers = []
        for j in range(6):
            model = NAMES[(i + j) % len(NAMES)]
            answers.append((model, ask(client, model, fake_sleep=0.05)))
        return answers

    with ThreadPoolExecutor(8) as pool:
        results = [answer for answers in pool.map(one_client, range(8)) for answer in answers]
    assert len(results) == 48
    wrong = [(model, text) for model, text in results if text != f"I am {model}."]
    assert wrong == []
    running = [name for name in NAMES if state(name) == "running"]
    assert len(running) == 1


def test_upstream_metrics_and_hostile_input() -> None:
    status, body = curl(f"{URL}/upstream/fd-beta/some/path?q=1")
    assert status == 200 and json.loads(body) == {"name": "fd-beta", "path": "/some/path?q=1"}
    bad = [
        (["-d", "{not json"], 400, "invalid_json"),
        (["-d", '{"messages": []}'], 400, "missing_model"),
        (["-d", '{"model": "no-such-model"}'], 404, "model_not_found"),
    ]
    for args, want_status, code in bad:
        status, body = curl("-H", "Content-Type: application/json", f"{URL}/v1/chat/completions", *args)
        assert (status, json.loads(body)["error"]["code"]) == (want_status, code)
    # a body over MaxBodyBytes (16M), sent from a file
    huge = Path("/run/gpusched-test/huge.json")
    huge.parent.mkdir(parents=True, exist_ok=True)
    huge.write_bytes(b'{"model": "fd-beta", "pad": "' + b"x" * (17 << 20) + b'"}')
    status, body = curl("-H", "Content-Type: application/json", f"{URL}/v1/chat/completions", "--data-binary",
                        f"@{huge}")  # fmt: skip
    huge.unlink()
    assert status == 413 and json.loads(body)["error"]["code"] == "request_entity_too_large"
    status, body = curl(f"{URL}/metrics")
    assert status == 200 and 'gpusched_frontdoor_responses_total{code="404"}' in body


def test_slow_clients_and_many_connections_do_not_block_others(client: openai.OpenAI) -> None:
    """1,000 idle connections and a client that sends half a body and stops: a normal request still gets through."""
    idle: list[socket.socket] = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", 8080)))
        slow = socket.create_connection(("127.0.0.1", 8080))
        idle.append(slow)
        slow.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model": ')
        assert ask(client, "fd-gamma") == "I am fd-gamma."
    finally:
        for s in idle:
            s.close()
    assert ask(client, "fd-gamma") == "I am fd-gamma."


def test_backend_crash_mid_request_is_502(client: openai.OpenAI) -> None:
    assert ask(client, "fd-beta") == "I am fd-beta."
    result: dict[str, object] = {}

    def long_request() -> None:
        try:
            result["answer"] = ask(client, "fd-beta", fake_sleep=30)
        except openai.APIStatusError as e:
            result["status"] = e.status_code

    worker = threading.Thread(target=long_request)
    worker.start()
    wait_until("the request to be in flight", lambda: in_flight("fd-beta") == 1, 30)
    run("systemctl", "kill", "--signal=KILL", "gpusched-model@fd-beta.service")
    worker.join(60)
    assert result == {"status": 502}
    # the next request brings the model up again (a cold start of the catalog model)
    wait_until("fd-beta to end", lambda: state("fd-beta") in ("stopped", "failed"), 30)
    assert ask(client, "fd-beta") == "I am fd-beta."


def queued_pair(client: openai.OpenAI) -> tuple[ThreadPoolExecutor, list, list]:
    """A request that keeps fd-alpha busy, and two for fd-gamma that must wait for it (MaxRunning=1)."""
    assert ask(client, "fd-alpha") == "I am fd-alpha."
    pool = ThreadPoolExecutor(4)

    def attempt(model: str, **extra: object) -> tuple[str, object]:
        try:
            return model, ask(client, model, **extra)
        except openai.APIStatusError as e:
            return model, e.status_code
        except openai.APIConnectionError:
            return model, "connection"

    busy = [pool.submit(attempt, "fd-alpha", fake_sleep=3)]
    wait_until("alpha busy", lambda: in_flight("fd-alpha") == 1, 30)
    queued = [pool.submit(attempt, "fd-gamma") for _ in range(2)]
    wait_until("gamma requests queued", lambda: waiting() >= 2, 30)
    return pool, busy, queued


def waiting() -> float:
    _, text = curl(f"{URL}/metrics")
    for line in text.splitlines():
        if line.startswith("gpusched_frontdoor_waiting "):
            return float(line.split()[-1])
    return 0.0


def test_restart_of_the_front_door_with_requests_queued(client: openai.OpenAI) -> None:
    pool, busy, queued = queued_pair(client)
    started = time.monotonic()
    run("systemctl", "restart", SERVICE, timeout=120)
    outcomes = [f.result(timeout=120) for f in busy + queued]
    pool.shutdown()
    log(f"after a restart of the front door ({time.monotonic() - started:.1f} s): {outcomes}")
    log(run("journalctl", "--no-pager", "-u", SERVICE, "-n", "40").stdout)
    # the request being served completes; the waiting ones are answered 503 at once, never by the wrong model
    assert outcomes[0] == ("fd-alpha", "I am fd-alpha.")
    for model, outcome in outcomes[1:]:
        assert outcome in (503, f"I am {model}.")
    assert ask(client, "fd-gamma") == "I am fd-gamma."  # the socket stayed; the new front door serves


def test_restart_of_gpuschedd_with_requests_queued(client: openai.OpenAI) -> None:
    pool, busy, queued = queued_pair(client)
    run("systemctl", "restart", "gpuschedd.service", timeout=120)
    outcomes = [f.result(timeout=120) for f in busy + queued]
    pool.shutdown()
    log(f"after a restart of gpuschedd: {outcomes}")
    for model, outcome in outcomes:
        assert outcome in (502, 503, f"I am {model}.")
    assert outcomes[0] == ("fd-alpha", "I am fd-alpha.")  # the model's server never noticed
    wait_until("gpuschedd back", lambda: run("busctl", "status", "org.gpusched1", check=False).returncode == 0, 30)
    assert ask(client, "fd-gamma") == "I am fd-gamma."
    assert ask(client, "fd-alpha") == "I am fd-alpha."


def test_frontdoor_user_may_bring_catalog_models_in_and_out_and_nothing_else() -> None:
    """The shipped rule gives the front door's user control-catalog only."""
    assert secutil.call_as(USER, "Freeze", "s", "fd-gamma").error in (None, "org.gpusched1.Error.InvalidState")
    for member, signature, body in (
        ("Stop", "s", ["fd-gamma"]),
        ("Forget", "s", ["fd-gamma"]),
        ("Reload", "", []),
        ("Run", "sasa{sv}", ["fd-evil", ["/bin/true"], {}]),
    ):
        reply = secutil.call_as(USER, member, signature, *body)
        assert reply.error == "org.freedesktop.DBus.Error.AccessDenied", (member, str(reply))


def test_the_service_runs_as_its_own_user() -> None:
    pid = run("systemctl", "show", "-P", "MainPID", SERVICE).stdout.strip()
    assert pid != "0"
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == secutil.uid_of(USER)
