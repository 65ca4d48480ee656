"""The front door's routing decisions, without HTTP and without D-Bus: which catalog model a request's `model` names,
what must happen before it can be proxied (nothing, thaw, swap, start), and which idle model leaves to make room.

The split of decisions (issue 17): the router knows which models have requests in flight, so it alone picks the model
to freeze (never one with a request in flight; lowest Priority= first, then least recently used; never one of higher
priority than the model coming in); the daemon knows memory, so a thaw or start that does not fit is refused by it
(InsufficientGpuMemory) and the router answers by freezing one more idle model and trying again.

Why the invariant "never freezes a model with a request in flight" holds (one asyncio thread: code between two
awaits runs alone): a model's in-flight count is raised only right after a state read under the lock found it
running, with nothing awaited in between, or when the count is already above zero (a model with a request in flight
is running, since the router never freezes it); a victim is chosen, by its count, under the lock and with nothing
awaited between the choice and the Freeze or Swap call, so no request can enter it in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..client_errors import BusError
from ..errors import GpuschedError, InsufficientGpuMemory, InvalidState, NoSuchModel
from .metrics import RouterMetrics
from .settings import Settings

log = logging.getLogger("gpusched-frontdoor")

RUNNING, FROZEN = "running", "frozen"
MOVING = frozenset({"freezing", "thawing"})  # another caller's transition: wait for it to end
STARTABLE = frozenset({"stopped", "failed"})
READY, AGAIN, MOVING_ON, WAIT = "ready", "again", "moving", "wait"  # what one step of bringing a model in found
POLL_S = 0.05  # how often a state or a port is looked at again while waiting for it
CATALOG_MAX_AGE_S = 1.0  # an unknown name re-reads the catalog at most this often (each read is N+1 bus calls)
CATALOG_REFRESH_S = 5.0  # any request re-reads it when older: a reload's new aliases and ports are seen this soon
T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A catalog model as the router needs it (the model object's Name, Aliases, BackendPort, Priority)."""

    name: str
    aliases: tuple[str, ...] = ()
    backend_port: int = 0
    priority: int = 0


class Daemon(Protocol):
    """What the router asks of gpuschedd (daemonlink.DaemonLink over the SDK; a fake in the unit tests). Failures are
    the SDK's typed errors (gpuschedd.errors, client_errors)."""

    async def catalog(self) -> list[Entry]: ...

    async def states(self) -> dict[str, str]: ...

    async def start(self, name: str) -> None: ...

    async def freeze(self, name: str) -> None: ...

    async def thaw(self, name: str) -> None: ...

    async def swap(self, freeze_name: str, thaw_name: str) -> None: ...


class RouterError(Exception):
    """A request the router cannot serve; server.py answers each subclass with its own HTTP status."""


class UnknownModel(RouterError):
    pass


class QueueFull(RouterError):
    pass


class NotReady(RouterError):
    """The model did not become ready within RequestTimeoutSec."""


class BackendDown(RouterError):
    """The model failed to come up (its start, thaw or port), or its process went away."""


class Unavailable(RouterError):
    """gpuschedd cannot be asked (not running, restarting, the bus gone), or the front door is stopping."""


async def port_accepts(port: int) -> bool:
    """True when 127.0.0.1:port accepts a TCP connection (the model's server is listening)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def choose_victim(
    entries: list[Entry], states: dict[str, str], busy: Counter[str], last_used: dict[str, float], incoming: Entry
) -> str | None:
    """The model to freeze for `incoming`: a running one with no request in flight and a Priority not above the
    incoming one's, the lowest priority first, then the least recently used. None: there is none."""
    candidates = [
        e
        for e in entries
        if e.name != incoming.name
        and states.get(e.name) == RUNNING
        and busy[e.name] == 0
        and e.priority <= incoming.priority
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda e: (e.priority, last_used.get(e.name, -math.inf))).name


class Router:
    def __init__(
        self,
        daemon: Daemon,
        settings: Settings,
        metrics: RouterMetrics,
        accepts: Callable[[int], Awaitable[bool]] = port_accepts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.daemon, self.settings, self.metrics = daemon, settings, metrics
        self._accepts, self._clock = accepts, clock
        self._entries: dict[str, Entry] = {}
        self._names: dict[str, str] = {}  # a model's name and each of its aliases -> its name
        self._catalog_read = -math.inf
        self._busy: Counter[str] = Counter()  # requests in flight, by model
        # requests waiting for their model, by model: a model brought in for them is not frozen for another before
        # they reach it (without this, waiters for three models and MaxRunning=1 swapped each other's out forever)
        self._wanted: Counter[str] = Counter()
        self._last_used: dict[str, float] = {}
        self._waiting = 0
        self._lock = asyncio.Lock()  # one transition at a time; decisions read the daemon's states under it
        self._idle_waiters: set[asyncio.Future[None]] = set()  # resolved when a request ends: a model may be idle
        self._closing = False
        self._waiters: set[asyncio.Task[object]] = set()

    # ------------------------------------------------------------- the catalog

    async def refresh(self) -> list[Entry]:
        """Read the catalog again. A model without BackendPort, or two sharing one, cannot be routed (a request must
        never reach another model's server): they are left out, with a warning; so is an alias naming two models."""
        entries = await self._ask(self.daemon.catalog())
        ports = Counter(e.backend_port for e in entries)
        routable = {}
        for e in entries:
            if e.backend_port == 0 or ports[e.backend_port] > 1:
                log.warning("catalog model %s not routed: BackendPort %d unset or shared", e.name, e.backend_port)
            else:
                routable[e.name] = e
        aliases = Counter(a for e in routable.values() for a in set(e.aliases) if a not in routable)
        names = {name: name for name in routable}
        for e in routable.values():
            for alias in e.aliases:
                if alias in routable or aliases[alias] > 1:
                    log.warning("alias %s of %s not routed: it names another model too", alias, e.name)
                else:
                    names[alias] = e.name
        self._entries, self._names, self._catalog_read = routable, names, self._clock()
        return list(routable.values())

    async def models(self) -> list[Entry]:
        return await self.refresh()

    async def resolve(self, model: str) -> Entry:
        """The catalog entry `model` names, from a reading at most CATALOG_REFRESH_S old (a reload may have moved an
        alias or a stopped model's port). When the daemon cannot be asked, a name already known is still resolved:
        a model with requests in flight is served without the daemon."""
        age = self._clock() - self._catalog_read
        if age >= CATALOG_REFRESH_S or (model not in self._names and age >= CATALOG_MAX_AGE_S):
            try:
                await self.refresh()
            except Unavailable:
                if model not in self._names:
                    raise
        name = self._names.get(model)
        if name is None:
            raise UnknownModel(f"The model `{model}` does not exist")
        return self._entries[name]

    # ------------------------------------------------------------- requests

    @contextlib.asynccontextmanager
    async def use(self, model: str) -> AsyncIterator[Entry]:
        """The catalog entry of `model`, once its server is running and accepting; the request counts as in flight
        (its model is never frozen) until the block ends."""
        if self._closing:
            raise Unavailable("the front door is stopping")
        entry = await self.resolve(model)
        name = entry.name
        self.metrics.requests.labels(name).inc()
        if self._busy[name] == 0:
            entry = await self._wait_ready(entry)
        self._busy[name] += 1
        self.metrics.in_flight.labels(name).inc()
        try:
            yield entry
        finally:
            self._busy[name] -= 1
            self.metrics.in_flight.labels(name).dec()
            self._last_used[name] = self._clock()
            self._wake()

    def _wake(self) -> None:
        """Requests that wait for room read the states again: a request ended, a waiter left, a model came in."""
        for waiter in self._idle_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_ready(self, entry: Entry) -> Entry:
        if self._waiting >= self.settings.queue_size:
            raise QueueFull(f"{self._waiting} requests are already waiting for their models; try again later")
        self._waiting += 1
        self._wanted[entry.name] += 1
        self.metrics.waiting.inc()
        started = self._clock()
        task = asyncio.current_task()
        assert task is not None
        self._waiters.add(task)
        try:
            async with asyncio.timeout(self.settings.request_timeout_sec):
                return await self._bring_in(entry)
        except TimeoutError:
            raise NotReady(
                f"model `{entry.name}` was not ready within {self.settings.request_timeout_sec:g} s"
            ) from None
        except asyncio.CancelledError:
            if not self._closing:
                raise
            task.uncancel()  # close() cancelled it: answered, not dropped
            raise Unavailable("the front door is stopping; try again") from None
        finally:
            self._waiters.discard(task)
            self._waiting -= 1
            self._wanted[entry.name] -= 1
            self._wake()
            self.metrics.waiting.dec()
            self.metrics.wait_seconds.labels(entry.name).observe(self._clock() - started)

    async def _bring_in(self, entry: Entry) -> Entry:
        """Until the model runs: one step at a time under the lock (_step), and between steps the lock is free, so a
        request that waits for another to end never holds up requests for other models. Returns the model's entry
        as last read, with nothing awaited after the state read that found it running."""
        loop = asyncio.get_running_loop()
        while True:
            # registered before the step reads the states, so a request that ends after that read is not missed
            released: asyncio.Future[None] = loop.create_future()
            self._idle_waiters.add(released)
            try:
                async with self._lock:
                    entry, outcome = await self._step(entry)
                if outcome == READY:
                    return entry
                if outcome == WAIT:
                    await released
                elif outcome == MOVING_ON:
                    await asyncio.sleep(POLL_S)
            finally:
                self._idle_waiters.discard(released)

    async def _step(self, entry: Entry) -> tuple[Entry, str]:
        """Read the states and do what the model needs: READY (it runs), AGAIN (something changed: read again),
        MOVING_ON (another caller's transition is under way), WAIT (every model that could make room has a request
        in flight: wait until one ends)."""
        if self._closing:
            raise Unavailable("the front door is stopping")
        states = await self._ask(self.daemon.states())
        entry = self._current(entry.name, list(self._entries.values()) if entry.name in states else [])
        state = states[entry.name]
        if state == RUNNING:
            return entry, READY
        if state in MOVING:
            return entry, MOVING_ON
        victim = None
        if self._over_limit(states, entry.name):
            victim = self._victim(states, entry, f"MaxRunning={self.settings.max_running}")
            if victim is None:
                return entry, WAIT
        try:
            await self._transition(entry, state, victim)
        except InvalidState:  # someone else changed a state since it was read
            return entry, AGAIN
        except InsufficientGpuMemory as e:
            room = self._victim(states, entry, e.message, short=True)
            if room is None:
                return entry, WAIT
            await self._freeze(room)
        self._wake()  # a model came in or went out: requests waiting for room look again
        return entry, AGAIN

    @staticmethod
    def _current(name: str, entries: list[Entry]) -> Entry:
        """The model's entry among `entries` (the catalog as last read); UnknownModel once it left the catalog."""
        for entry in entries:
            if entry.name == name:
                return entry
        raise UnknownModel(f"The model `{name}` is no longer in the catalog")

    def _over_limit(self, states: dict[str, str], name: str) -> bool:
        limit = self.settings.max_running
        running = [n for n in self._entries if n != name and states.get(n) in (RUNNING, "thawing")]
        return limit > 0 and len(running) >= limit

    def _victim(self, states: dict[str, str], entry: Entry, why: str, short: bool = False) -> str | None:
        """An idle model to freeze for `entry`; None when every candidate has a request in flight. With nothing that
        could ever make room (short of memory and no other catalog model running), BackendDown."""
        victim = choose_victim(list(self._entries.values()), states, self._busy + self._wanted, self._last_used, entry)
        if victim is None and short and not any(states.get(n) == RUNNING for n in self._entries if n != entry.name):
            raise BackendDown(f"model `{entry.name}` cannot be brought in: {why}")
        return victim

    async def _transition(self, entry: Entry, state: str, victim: str | None) -> None:
        name = entry.name
        if state == FROZEN and victim is not None:
            await self._timed("swap", self.daemon.swap(victim, name))
            self._last_used[victim] = self._clock()
        elif state == FROZEN:
            await self._timed("thaw", self.daemon.thaw(name))
        elif state in STARTABLE:
            if victim is not None:
                await self._freeze(victim)
            await self._timed("start", self._start(entry))
        else:
            raise BackendDown(f"model `{name}` is {state}")

    async def _start(self, entry: Entry) -> None:
        """Start the model and wait until its port accepts; its process ending first is BackendDown. The catalog is
        read first: a stopped model takes its file's definition as it is now (its port may have changed)."""
        entry = self._current(entry.name, await self.refresh())
        await self._ask(self.daemon.start(entry.name))
        self._last_used[entry.name] = self._clock()
        last_look = self._clock()
        while not await self._accepts(entry.backend_port):
            await asyncio.sleep(POLL_S)
            if self._clock() - last_look >= 10 * POLL_S:
                last_look = self._clock()
                state = (await self._ask(self.daemon.states())).get(entry.name)
                if state != RUNNING:
                    raise BackendDown(f"model `{entry.name}` is {state or 'gone'} instead of serving on its port")

    async def _freeze(self, name: str) -> None:
        await self._timed("freeze", self.daemon.freeze(name))

    async def _timed(self, action: str, call: Awaitable[None]) -> None:
        started = self._clock()
        await self._ask(call)
        self.metrics.swap_seconds.labels(action).observe(self._clock() - started)

    async def _ask(self, call: Awaitable[T]) -> T:
        """A daemon call; the bus's own failures (no daemon, restarting, no answer) become Unavailable, a model gone
        from the catalog UnknownModel, and any other refusal but the two _bring_in handles BackendDown."""
        try:
            return await call
        except (InvalidState, InsufficientGpuMemory):
            raise
        except NoSuchModel as e:
            raise UnknownModel(e.message) from None
        except BusError as e:
            raise Unavailable(f"gpuschedd: {e.message}") from None
        except GpuschedError as e:
            raise BackendDown(f"gpuschedd: {e.message}") from None

    # ------------------------------------------------------------- idle models, shutdown

    async def freeze_idle(self) -> list[str]:
        """Freeze the catalog models that served no request for IdleFreezeSec= (and have none in flight)."""
        idle_sec = self.settings.idle_freeze_sec
        if idle_sec == 0 or not self._entries:
            return []
        frozen = []
        async with self._lock:
            states = await self._ask(self.daemon.states())
            now = self._clock()
            for name in self._entries:
                last = self._last_used.setdefault(name, now)  # first seen now: idle from now on
                if states.get(name) == RUNNING and self._busy[name] == 0 and now - last >= idle_sec:
                    await self._freeze(name)
                    frozen.append(name)
        return frozen

    def close(self) -> None:
        """Stop taking requests: those waiting for their model end at once with Unavailable (they are cancelled,
        wherever they wait: the lock, a daemon call, a port), those in flight go on."""
        self._closing = True
        for task in self._waiters:
            task.cancel()
