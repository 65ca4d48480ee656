"""The front door's routing decisions (gpuschedd.frontdoor.router) against a fake of the daemon that keeps its rules
(fake_daemon.py): what a request for a running, frozen or stopped model makes happen, which model leaves for it, and
how it fails."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_daemon import FakeDaemon

from gpuschedd.frontdoor.metrics import RouterMetrics
from gpuschedd.frontdoor.router import (
    CATALOG_REFRESH_S,
    BackendDown,
    Entry,
    NotReady,
    QueueFull,
    Router,
    Unavailable,
    UnknownModel,
    choose_victim,
)
from gpuschedd.frontdoor.settings import ConfigError, Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_router(daemon: FakeDaemon, clock: Clock) -> Callable[..., Router]:
    def make(**settings: object) -> Router:
        return Router(daemon, Settings(**settings), RouterMetrics(), accepts=daemon.accepts, clock=clock)  # type: ignore[arg-type]

    return make


async def hold(router: Router, model: str, release: asyncio.Event, entered: asyncio.Event | None = None) -> str:
    """A request that stays in flight until `release` is set; returns the model it was routed to."""
    async with router.use(model) as entry:
        if entered is not None:
            entered.set()
        await release.wait()
        return entry.name


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# ------------------------------------------------------------------ the catalog


async def test_names_and_aliases_resolve(daemon: FakeDaemon, make_router: Callable[..., Router]) -> None:
    daemon.add("qwen", 9001, "running", aliases=("gpt-4o", "default"))
    router = make_router()
    assert (await router.resolve("qwen")).name == "qwen"
    assert (await router.resolve("gpt-4o")).name == "qwen"
    with pytest.raises(UnknownModel):
        await router.resolve("llama")


async def test_unknown_names_reread_the_catalog_at_most_once_a_second(
    daemon: FakeDaemon, make_router: Callable[..., Router], clock: Clock
) -> None:
    daemon.add("qwen", 9001, "running")
    router = make_router()
    for _ in range(50):
        with pytest.raises(UnknownModel):
            await router.resolve("nope")
    assert daemon.catalog_reads == 1
    daemon.add("late", 9002, "stopped")  # a reload added it
    clock.now += 1.0
    assert (await router.resolve("late")).name == "late"
    assert daemon.catalog_reads == 2


async def test_shared_or_missing_ports_and_ambiguous_aliases_are_not_routed(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.add("a", 9001, aliases=("both", "b"))
    daemon.add("b", 9002, aliases=("both",))
    daemon.add("c", 9003)
    daemon.add("d", 9003)
    daemon.add("e", 0)
    router = make_router()
    assert sorted(e.name for e in await router.models()) == ["a", "b"]
    for name in ("both", "c", "d", "e"):
        with pytest.raises(UnknownModel):
            await router.resolve(name)
    assert (await router.resolve("b")).name == "b"  # a name wins over another model's alias


async def test_a_reload_is_seen_within_catalog_refresh_s(
    daemon: FakeDaemon, make_router: Callable[..., Router], clock: Clock
) -> None:
    daemon.add("a", 9001, "running", aliases=("chat",))
    daemon.add("b", 9002, "running")
    router = make_router()
    assert (await router.resolve("chat")).name == "a"
    daemon.models["a"].entry = Entry("a", (), 9001)  # the alias moved from a to b
    daemon.models["b"].entry = Entry("b", ("chat",), 9002)
    clock.now += CATALOG_REFRESH_S
    assert (await router.resolve("chat")).name == "b"


async def test_a_start_uses_the_port_the_catalog_says_now(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    model = daemon.add("a", 9001, "stopped")
    router = make_router(request_timeout_sec=5)
    await router.refresh()
    model.entry = Entry("a", (), 9005)  # changed by a reload while it was stopped
    async with router.use("a") as entry:
        assert entry.backend_port == 9005


async def test_known_names_resolve_while_the_daemon_is_gone(
    daemon: FakeDaemon, make_router: Callable[..., Router], clock: Clock
) -> None:
    daemon.add("a", 9001, "running")
    router = make_router()
    release, entered = asyncio.Event(), asyncio.Event()
    busy = asyncio.create_task(hold(router, "a", release, entered))
    await entered.wait()
    daemon.down = True
    clock.now += CATALOG_REFRESH_S
    async with router.use("a") as entry:  # a request is in flight: a runs, no daemon call is needed
        assert entry.name == "a"
    with pytest.raises(Unavailable):
        await router.resolve("new-model")
    release.set()
    await busy


# ------------------------------------------------------------------ bringing a model in


async def test_running_model_is_used_as_it_is(daemon: FakeDaemon, make_router: Callable[..., Router]) -> None:
    daemon.add("a", 9001, "running")
    router = make_router()
    async with router.use("a") as entry:
        assert entry.backend_port == 9001
    assert daemon.calls == []


async def test_frozen_model_is_thawed(daemon: FakeDaemon, make_router: Callable[..., Router]) -> None:
    daemon.add("a", 9001, "frozen")
    async with make_router().use("a"):
        assert daemon.models["a"].state == "running"
    assert daemon.calls == [("thaw", "a")]


async def test_stopped_model_is_started_and_waited_for_until_its_port_accepts(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    model = daemon.add("a", 9001, "stopped", loading=3)
    async with make_router().use("a"):
        assert model.state == "running" and model.loading == 0
    assert daemon.calls == [("start", "a")]


async def test_a_model_that_dies_while_starting_is_backend_down(
    daemon: FakeDaemon, make_router: Callable[..., Router], clock: Clock
) -> None:
    daemon.add("a", 9001, "stopped", loading=10**6)
    daemon.crash_on_start.add("a")
    router = make_router()

    async def later() -> None:  # the router looks at the state again after 10 polls of the port
        while True:
            clock.now += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(later())
    with pytest.raises(BackendDown, match="failed"):
        async with router.use("a"):
            pass
    ticking.cancel()


async def test_concurrent_requests_for_a_frozen_model_thaw_it_once(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.delay = 0.02
    daemon.add("a", 9001, "frozen")
    router = make_router()

    async def one() -> str:
        async with router.use("a") as entry:
            return entry.name

    assert await asyncio.gather(*(one() for _ in range(20))) == ["a"] * 20
    assert daemon.calls == [("thaw", "a")]


async def test_max_running_swaps_out_the_least_recently_used_idle_model(
    daemon: FakeDaemon, make_router: Callable[..., Router], clock: Clock
) -> None:
    for name, port in (("a", 9001), ("b", 9002)):
        daemon.add(name, port, "running")
    daemon.add("c", 9003, "frozen")
    router = make_router(max_running=2)
    async with router.use("b"):
        pass
    clock.now += 1
    async with router.use("a"):  # a is used last: b is the least recently used
        pass
    async with router.use("c"):
        pass
    assert daemon.calls == [("swap", "b", "c")]
    assert daemon.models["a"].state == "running"


async def test_max_running_freezes_before_a_cold_start(daemon: FakeDaemon, make_router: Callable[..., Router]) -> None:
    daemon.add("a", 9001, "running")
    daemon.add("b", 9002, "stopped")
    async with make_router(max_running=1).use("b"):
        pass
    assert daemon.calls == [("freeze", "a"), ("start", "b")]


async def test_a_model_with_a_request_in_flight_is_never_frozen(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.add("a", 9001, "running")
    daemon.add("b", 9002, "frozen")
    router = make_router(max_running=1)
    release, entered = asyncio.Event(), asyncio.Event()
    busy = asyncio.create_task(hold(router, "a", release, entered))
    await entered.wait()
    waiting = asyncio.create_task(hold(router, "b", asyncio.Event()))
    for _ in range(5):
        await asyncio.sleep(0.01)
        # requests for a keep coming in and go straight through while b waits
        async with router.use("a"):
            pass
    assert daemon.calls == [] and daemon.models["a"].state == "running"
    release.set()
    assert await busy == "a"
    await asyncio.sleep(0.05)
    assert daemon.calls == [("swap", "a", "b")]
    waiting.cancel()


async def test_requests_for_several_models_all_get_through_one_slot(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    """MaxRunning=1, two requests waiting for each of three models: a model brought in for its waiters is not
    swapped out for another model's before they reach it (that swapped the three round and round until every
    request timed out). Each request is answered, by its model."""
    for i, name in enumerate(("a", "b", "c")):
        daemon.add(name, 9001 + i, "running" if name == "a" else "frozen")
    router = make_router(max_running=1, request_timeout_sec=5)

    async def ask(model: str) -> str:
        async with router.use(model) as entry:
            await asyncio.sleep(0)
            return entry.name

    names = ["a", "b", "c"] * 2
    assert await asyncio.gather(*(ask(n) for n in names)) == names
    assert len([c for c in daemon.calls if c[0] == "swap"]) <= 4


async def test_a_model_of_higher_priority_is_not_frozen_for_a_lower_one(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.add("important", 9001, "running", priority=10)
    daemon.add("b", 9002, "frozen", priority=0)
    router = make_router(max_running=1, request_timeout_sec=0.05)
    with pytest.raises(NotReady):
        async with router.use("b"):
            pass
    assert daemon.calls == []


async def test_a_request_waiting_for_a_busy_model_does_not_hold_up_the_others(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.add("busy", 9001, "running")
    daemon.add("important", 9002, "running", priority=10)
    daemon.add("low", 9003, "frozen")
    router = make_router(max_running=2)
    release, entered = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(hold(router, "busy", release, entered))
    await entered.wait()
    waiting = asyncio.create_task(hold(router, "low", asyncio.Event()))  # no victim: busy, or of higher priority
    await settle()
    async with asyncio.timeout(5), router.use("important") as entry:  # idle and running: served at once
        assert entry.name == "important"
    assert not waiting.done()
    release.set()
    await serving
    await asyncio.sleep(0.05)
    assert daemon.calls == [("swap", "busy", "low")]
    waiting.cancel()


async def test_short_of_gpu_memory_freezes_an_idle_model_and_tries_again(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.gpu = 2
    daemon.add("a", 9001, "running")
    daemon.add("b", 9002, "running")
    daemon.add("c", 9003, "frozen")
    router = make_router()
    async with router.use("c"):
        pass
    thaws, freezes = Counter(c[0] for c in daemon.calls)["thaw"], [c for c in daemon.calls if c[0] == "freeze"]
    assert thaws == 2 and len(freezes) == 1  # refused once, one model frozen, then the thaw fits
    assert daemon.models["c"].state == "running"


async def test_short_of_memory_with_no_catalog_model_to_freeze_is_backend_down(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.gpu = 0  # something outside the catalog holds the GPU
    daemon.add("a", 9001, "frozen")
    with pytest.raises(BackendDown, match="needs"):
        async with make_router().use("a"):
            pass


async def test_state_changed_by_someone_else_is_read_again(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    model = daemon.add("a", 9001, "frozen")
    real_thaw = daemon.thaw

    async def thawed_meanwhile(name: str) -> None:
        model.state = "running"  # `gpusched thaw a` got there first
        await real_thaw(name)

    daemon.thaw = thawed_meanwhile  # type: ignore[method-assign]
    async with make_router().use("a"):
        pass
    assert model.state == "running"


# ------------------------------------------------------------------ failing cleanly


async def test_the_queue_is_bounded(daemon: FakeDaemon, make_router: Callable[..., Router]) -> None:
    daemon.add("a", 9001, "running")
    daemon.add("b", 9002, "frozen")
    router = make_router(max_running=1, queue_size=1)
    release = asyncio.Event()
    busy = asyncio.create_task(hold(router, "a", release))
    await settle()
    waiting = asyncio.create_task(hold(router, "b", asyncio.Event()))
    await settle()
    with pytest.raises(QueueFull):
        async with router.use("b"):
            pass
    async with router.use("a"):  # a running model with a request in flight needs no place in the queue
        pass
    release.set()
    await busy
    waiting.cancel()


async def test_a_request_waits_at_most_request_timeout_sec(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.delay = 10
    daemon.add("a", 9001, "frozen")
    router = make_router(request_timeout_sec=0.05)
    with pytest.raises(NotReady, match=r"0\.05 s"):
        async with router.use("a"):
            pass
    assert router._waiting == 0


async def test_no_daemon_is_unavailable(daemon: FakeDaemon, make_router: Callable[..., Router]) -> None:
    daemon.add("a", 9001, "frozen")
    router = make_router()
    await router.refresh()
    daemon.down = True
    with pytest.raises(Unavailable, match="not running"):
        async with router.use("a"):
            pass


async def test_a_model_removed_from_the_catalog_is_unknown(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.add("a", 9001, "frozen")
    router = make_router()
    await router.refresh()
    del daemon.models["a"]
    with pytest.raises(UnknownModel):
        async with router.use("a"):
            pass


async def test_close_answers_the_waiting_requests_and_lets_the_others_finish(
    daemon: FakeDaemon, make_router: Callable[..., Router]
) -> None:
    daemon.delay = 10
    daemon.add("a", 9001, "running")
    daemon.add("b", 9002, "frozen")
    router = make_router()
    release, entered = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(hold(router, "a", release, entered))
    await entered.wait()
    waiting = asyncio.create_task(hold(router, "b", asyncio.Event()))
    await asyncio.sleep(0.01)
    router.close()
    with pytest.raises(Unavailable, match="stopping"):
        await waiting
    release.set()
    assert await serving == "a"
    with pytest.raises(Unavailable):
        async with router.use("a"):
            pass


# ------------------------------------------------------------------ idle models


async def test_idle_models_are_frozen_after_idle_freeze_sec(
    daemon: FakeDaemon, make_router: Callable[..., Router], clock: Clock
) -> None:
    for name, port in (("a", 9001), ("b", 9002), ("c", 9003)):
        daemon.add(name, port, "running")
    router = make_router(idle_freeze_sec=60)
    release = asyncio.Event()
    busy = asyncio.create_task(hold(router, "a", release))
    await settle()
    assert await router.freeze_idle() == []  # first seen now
    async with router.use("b"):
        pass
    clock.now += 30
    async with router.use("b"):
        pass
    clock.now += 31
    assert await router.freeze_idle() == ["c"]  # a has a request in flight, b was used 31 s ago
    release.set()
    await busy


# ------------------------------------------------------------------ the choice, alone


def test_choose_victim_order() -> None:
    entries = [Entry("low-old", (), 1, 0), Entry("low-new", (), 2, 0), Entry("high", (), 3, 5), Entry("in", (), 4, 5)]
    states = dict.fromkeys(("low-old", "low-new", "high"), "running")
    used = {"low-old": 1.0, "low-new": 2.0, "high": 0.0}
    assert choose_victim(entries, states, Counter(), used, entries[3]) == "low-old"
    assert choose_victim(entries, states, Counter({"low-old": 1}), used, entries[3]) == "low-new"
    assert choose_victim(entries, states, Counter({"low-old": 1, "low-new": 1}), used, entries[3]) == "high"
    assert choose_victim(entries, states, Counter(), used, Entry("in", (), 4, -1)) is None
    assert choose_victim(entries, {**states, "low-old": "frozen"}, Counter(), used, entries[3]) == "low-new"


# ------------------------------------------------------------------ settings


def test_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "frontdoor.conf"
    path.write_text("[FrontDoor]\nMaxRunning=1\nQueueSize=8\nRequestTimeoutSec=2.5\nMaxBodyBytes=1M\n")
    s = Settings.load(str(path))
    assert (s.max_running, s.queue_size, s.request_timeout_sec, s.max_body_bytes) == (1, 8, 2.5, 1 << 20)
    # a drop-in, read after it, wins; as for gpuschedd.conf
    (tmp_path / "frontdoor.conf.d").mkdir()
    (tmp_path / "frontdoor.conf.d" / "50-local.conf").write_text("[FrontDoor]\nQueueSize=4\n")
    assert Settings.load(str(path)).queue_size == 4
    (tmp_path / "frontdoor.conf.d" / "50-local.conf").unlink()
    for bad in ("QueueSize=0", "RequestTimeoutSec=0", "MaxRunnig=1", "Listen=nowhere", "Listen="):
        path.write_text(f"[FrontDoor]\n{bad}\n")
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            Settings.load(str(path))
    assert Settings.load(str(path) + ".missing") == Settings()
