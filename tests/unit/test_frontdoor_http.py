"""The front door's HTTP side (gpuschedd.frontdoor.server) in one process: aiohttp's test server in front, the fake
daemon (fake_daemon.py) behind the router, and real OpenAI-compatible servers (tests/fake_openai.py, in threads) as
the models. The system tests (tests/system/test_frontdoor.py) do the same with the installed units and daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_daemon import FakeDaemon
from fake_openai import FakeServer

from gpuschedd.frontdoor import serve
from gpuschedd.frontdoor.metrics import RouterMetrics
from gpuschedd.frontdoor.router import Entry, Router
from gpuschedd.frontdoor.server import FrontDoor
from gpuschedd.frontdoor.settings import Settings


@pytest.fixture
def backends() -> Iterator[dict[str, FakeServer]]:
    servers = {name: FakeServer(name) for name in ("alpha", "beta")}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture
def daemon(backends: dict[str, FakeServer]) -> FakeDaemon:
    fake = FakeDaemon()
    fake.add("alpha", backends["alpha"].server_address[1], "running", aliases=("gpt-4o",))
    fake.add("beta", backends["beta"].server_address[1], "frozen")
    return fake


@pytest.fixture
async def door(daemon: FakeDaemon) -> AsyncIterator[TestServer]:
    settings = Settings(max_running=1, max_body_bytes=1 << 16, queue_size=4)
    metrics = RouterMetrics()
    server = TestServer(FrontDoor(Router(daemon, settings, metrics), settings, metrics).app())
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def http(door: TestServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(door.make_url(""))) as session:
        yield session


@pytest.fixture
def client(door: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(door.make_url("/v1")), api_key="none", max_retries=0)


async def answer(client: openai.AsyncOpenAI, model: str) -> str:
    reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "who?"}])
    return reply.choices[0].message.content or ""


async def test_requests_reach_the_model_they_name(client: openai.AsyncOpenAI, daemon: FakeDaemon) -> None:
    assert await answer(client, "alpha") == "I am alpha."
    assert await answer(client, "gpt-4o") == "I am alpha."
    assert await answer(client, "beta") == "I am beta."  # frozen: swapped in for alpha (MaxRunning=1)
    assert daemon.calls == [("swap", "alpha", "beta")]
    completion = await client.completions.create(model="beta", prompt="who?")
    assert completion.choices[0].text == "I am beta."
    embedding = await client.embeddings.create(model="beta", input="x")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]


async def test_streaming_passes_through(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "who?"}], stream=True
    )
    pieces = [chunk.choices[0].delta.content async for chunk in stream]
    assert pieces == ["I", " am", " beta", "."]


async def test_models_lists_the_catalog(client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    assert sorted([m.id async for m in client.models.list()]) == ["alpha", "beta"]
    async with http.get("/v1/models") as r:
        rows = {m["id"]: m["aliases"] for m in (await r.json())["data"]}
    assert rows == {"alpha": ["gpt-4o"], "beta": []}
    assert (await client.models.retrieve("gpt-4o")).id == "alpha"


async def test_upstream_passes_any_path(http: aiohttp.ClientSession) -> None:
    async with http.get("/upstream/gpt-4o/health?x=1") as r:
        assert await r.json() == {"name": "alpha", "path": "/health?x=1"}


async def test_errors_are_openai_error_bodies(client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await answer(client, "nope")
    assert e.value.code == "model_not_found"
    for body, status, code in (
        (b"{not json", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 3}', 400, "missing_model"),
        (b"[1, 2]", 400, "missing_model"),
        (b'{"model": "alpha", "pad": "' + b"x" * (1 << 17) + b'"}', 413, "request_entity_too_large"),
    ):
        async with http.post("/v1/chat/completions", data=body) as r:
            error = (await r.json())["error"]
            assert (r.status, error["code"]) == (status, code)
            assert error["type"] == "invalid_request_error" and error["message"]
    async with http.get("/v2/nothing") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_a_backend_that_does_not_answer_is_502(client: openai.AsyncOpenAI, daemon: FakeDaemon) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        daemon.models["alpha"].entry = Entry("alpha", (), s.getsockname()[1], 0)
    with pytest.raises(openai.APIStatusError) as e:
        await answer(client, "alpha")
    assert e.value.status_code == 502


async def test_a_daemon_that_is_gone_is_503(client: openai.AsyncOpenAI, daemon: FakeDaemon) -> None:
    daemon.down = True
    with pytest.raises(openai.APIStatusError) as e:
        await answer(client, "beta")
    assert e.value.status_code == 503 and e.value.code == "service_unavailable"


async def test_metrics_count_requests_waits_and_swaps(client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    await answer(client, "alpha")
    await answer(client, "beta")
    with pytest.raises(openai.NotFoundError):
        await answer(client, "nope")
    async with http.get("/metrics") as r:
        text = await r.text()
    assert 'gpusched_frontdoor_requests_total{model="beta"} 1.0' in text
    assert 'gpusched_frontdoor_swap_seconds_count{action="swap"} 1.0' in text
    assert 'gpusched_frontdoor_wait_seconds_count{model="beta"} 1.0' in text
    assert 'gpusched_frontdoor_responses_total{code="404"} 1.0' in text


async def test_streaming_is_not_buffered(daemon: FakeDaemon) -> None:
    """The model sends one event, then waits until the client has it through the front door: a front door that
    buffered the answer would never deliver it, and the test would time out."""
    delivered = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await asyncio.wait_for(delivered.wait(), 10)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", sse)
    backend = TestServer(app, host="127.0.0.1")
    await backend.start_server()
    daemon.add("slow", backend.port or 0, "running")
    settings = Settings()
    metrics = RouterMetrics()
    door = TestServer(FrontDoor(Router(daemon, settings, metrics), settings, metrics).app())
    await door.start_server()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(door.make_url("/v1/chat/completions"), json={"model": "slow", "stream": True}) as r,
        ):
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert json.loads(first.removeprefix(b"data: ")) == {"n": 1}
            delivered.set()
            assert await r.content.read() == b"data: [DONE]\n\n"
    finally:
        await door.close()
        await backend.close()


async def test_serve_takes_the_socket_from_systemd_and_stops_on_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() as the unit runs it: the listening socket from LISTEN_FDS (sd_listen_fds), SIGTERM a clean stop."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # Where systemd would put it is fd 3; the test's process has its own there. serve() owns the socket from now on.
    monkeypatch.setattr("gpuschedd.frontdoor.SD_LISTEN_FDS_START", listener.detach())
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    server = asyncio.create_task(serve(Settings(listen="127.0.0.1:1")))
    async with aiohttp.ClientSession() as http:
        for _ in range(1500):  # up to 30 s: a loaded CI machine starts it slowly
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200 and "gpusched_frontdoor_waiting" in await r.text()
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        else:
            pytest.fail("the front door did not answer on the socket it was given")
    assert "LISTEN_FDS" not in os.environ
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(server, 10)


async def test_a_silent_model_is_504(daemon: FakeDaemon) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", silent)
    backend = TestServer(app, host="127.0.0.1")
    await backend.start_server()
    daemon.add("mute", backend.port or 0, "running")
    settings = Settings(backend_timeout_sec=0.1)
    metrics = RouterMetrics()
    door = TestServer(FrontDoor(Router(daemon, settings, metrics), settings, metrics).app())
    await door.start_server()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(door.make_url("/v1/chat/completions"), json={"model": "mute"}) as r,
        ):
            assert r.status == 504 and (await r.json())["error"]["code"] == "model_not_ready"
    finally:
        await door.close()
        await backend.close()
