"""Run, stop and forget: a model's life in the table."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from .. import events, preload
from ..agent.protocol import AGENT_DIR_ENV, DAEMON_UID_ENV
from ..catalog import Entry
from ..errors import (
    AccessDenied,
    GpuschedError,
    InvalidArgs,
    InvalidState,
    LimitExceeded,
    ModelExists,
    NotSupported,
)
from ..events import Event
from ..model import ENDED, Model, State, require
from ..names import model_name_from_unit, model_unit, validate_model_name
from ..options import Policies, RunOptions
from ..units import UnitSpec, UnitStatus, WakeCapable
from .core import Core, Requester, _kept_bytes, _user_name, _user_uid

log = logging.getLogger(__name__)


def _ld_preload(environment: list[str]) -> str:
    """LD_PRELOAD with the interposer first, then whatever the caller's Environment preloads (its last entry wins in
    systemd, so this one, appended, does); NotSupported where the library is not installed."""
    library = preload.library_path()
    if not os.path.isfile(library):
        raise NotSupported(f"InjectAgent needs {preload.LIBRARY_NAME}, which is not installed ({library})")
    theirs = [e.split("=", 1)[1] for e in environment if e.startswith("LD_PRELOAD=")]
    return "LD_PRELOAD=" + " ".join([library, *theirs[-1:]]).strip()


class Lifecycle(Core):
    """Run, Stop and Forget, and the wake units that go with a model's life."""

    async def run(
        self,
        name: str,
        argv: list[str],
        options: RunOptions,
        owner: int,
        by: Requester | None = None,
        catalog: Entry | None = None,
    ) -> Model:
        """An entry point: start a new model. `by`: whose rights an eviction for the start has (default: the owner's
        own models only). `catalog`: the catalog's definition it starts (Start: engine/catalog.py), which the
        model keeps; the admin wrote it, so the owner's limits do not apply.

        One model lock, never two: evictions for GpuMemory freeze each victim under its own lock before the new
        model's is taken. No await between check and reservation: _admit checks the name and the owner's limits
        and reserves the name in the table with no await between them."""
        user = self._run_user(name, argv, options, owner, catalog is not None)
        spec = self._unit_spec(name, argv, options, user)
        model = self._new_model(name, spec, _user_uid(user) if user else owner, options)
        if catalog is not None:
            model.catalog_digest, model.aliases = catalog.digest, list(catalog.aliases)
        if options.port and not isinstance(self.units, WakeCapable):
            raise InvalidArgs(f"Port needs the systemd unit backend, not {self.units.name}")
        shortfall = self._start_shortfall(model, options)
        if self.config.evict_on_thaw:
            await self._evict_for(model, shortfall, "the start", by or Requester(owner))
        self._check_gpu_room(model, shortfall())
        t0 = time.monotonic()
        status = await self._admit(model, lambda: self.units.start(spec), 0 if catalog else owner)
        if options.port and isinstance(self.units, WakeCapable):
            try:
                await self.units.start_wake(name, options.port, options.backend_port, user, options.listen_address)
            except BaseException:
                await self.stop(name)
                raise
        self._announce(status, events.started(model, int((time.monotonic() - t0) * 1e6)))
        return model

    def _run_user(self, name: str, argv: list[str], options: RunOptions, owner: int, catalog: bool = False) -> str:
        """Refuse a Run that cannot be (bad name, empty argv, the name taken or the catalog's, KeepContext without
        Agent, root for a caller that is not root); returns the user its processes run as ("": root)."""
        validate_model_name(name)
        if not argv:
            raise InvalidArgs("argv must not be empty")
        self._check_name_free(name, catalog)
        if owner < 0:
            raise AccessDenied("unknown caller")
        user = options.user or (_user_name(owner) if owner != 0 else "")
        if owner != 0 and (not user or _user_uid(user) == 0):
            # The bus layer allows User= only with `manage`; this holds even if that check ever goes wrong:
            # a caller that is not root never gets a process running as root (any name with uid 0 included).
            raise AccessDenied("only root may run a model as root")
        if options.keep_context and not (options.agent or options.inject_agent):
            raise InvalidArgs("KeepContext needs Agent: only a model whose agents park its memory keeps its contexts")
        return user

    def _unit_spec(self, name: str, argv: list[str], options: RunOptions, user: str) -> UnitSpec:
        """The unit of a new model: its environment carries the GPUs it may see, where its agents listen and, with
        InjectAgent, the interposer preloaded."""
        environment = list(options.environment)
        if options.inject_agent:
            environment.append(_ld_preload(environment))
        if options.gpus:
            environment.append("CUDA_VISIBLE_DEVICES=" + ",".join(options.gpus))
        agent_dir = os.path.join(self.config.agent_root, name) if options.agent or options.inject_agent else ""
        if agent_dir:
            environment += [f"{AGENT_DIR_ENV}={agent_dir}", f"{DAEMON_UID_ENV}={os.geteuid()}"]
        return UnitSpec(
            unit=model_unit(name),
            argv=list(argv),
            description=options.description or f"gpusched model {name}",
            working_directory=options.working_directory,
            environment=environment,
            user=user,
            runtime_directory=agent_dir,
        )

    def _new_model(self, name: str, spec: UnitSpec, uid: int, options: RunOptions) -> Model:
        model = Model(
            name=name,
            unit=spec.unit,
            owner=uid,
            command=list(spec.argv),
            gpus=list(options.gpus),
            port=options.port,
            backend_port=options.backend_port,
            listen_address=options.listen_address,
            agent=options.agent or options.inject_agent,
            inject_agent=options.inject_agent,
            keep_context=options.keep_context,
            environment_bytes=sum(len(entry.encode()) + 1 for entry in options.environment),
        )
        self._set_policies(model, options)
        return model

    def _set_policies(self, model: Model, policies: Policies) -> None:
        """A new model's policies; its idle time starts now."""
        model.priority = policies.priority
        model.idle_freeze_sec = policies.idle_freeze_sec
        model.frozen_ttl_sec = policies.frozen_ttl_sec
        model.last_active_usec = self.now_usec()

    async def _admit(self, model: Model, start: Callable[[], Awaitable[UnitStatus]], caller: int) -> UnitStatus:
        """Enter a new model in the table around the start of its unit. The name is reserved before the first
        await, so two concurrent calls for one name cannot both start (nor two calls of one user both pass its
        limits); a start that fails leaves no trace. An ended model of the same name is replaced."""
        async with model.lock:
            existing = self.models.get(model.name)
            if existing is not None and existing.state not in ENDED:
                raise ModelExists(f"model {model.name!r} exists ({existing.state})")
            self._check_limits(model, caller)
            if existing is not None:
                self._remove(existing)
            self.models[model.name] = model
            try:
                status = await start()
            except BaseException:
                del self.models[model.name]
                raise
            self._apply_status(model, status)
            del self.models[model.name]
            self._add(model)
        return status

    def _check_limits(self, model: Model, caller: int) -> None:
        """Refuse a new model past its owner's limits (MaxModelsPerUser=, MaxCommandBytesPerUser=), counting every
        model of the owner in the table, ended ones too, except an ended model of the same name that the new one
        replaces and the catalog's models (the admin's). Root is exempt. Without an await, so it holds until the
        caller's next await."""
        if caller == 0:
            return
        mine = [
            m for m in self.models.values() if m.owner == model.owner and m.name != model.name and not m.catalog_digest
        ]
        most, most_bytes = self.config.max_models_per_user, self.config.max_command_bytes_per_user
        if most and len(mine) >= most:
            self._refuse(
                model,
                LimitExceeded(
                    f"uid {model.owner} has {len(mine)} models, the most MaxModelsPerUser= allows: stop and forget"
                    " one first (ended models are dropped EndedModelTTLSec= after they end). Nothing was started."
                ),
            )
        kept = sum(_kept_bytes(m) for m in mine)
        if most_bytes and kept + _kept_bytes(model) > most_bytes:
            self._refuse(
                model,
                LimitExceeded(
                    f"model {model.name}'s argv and Environment ({_kept_bytes(model)} bytes) with those of uid"
                    f" {model.owner}'s other models ({kept} bytes) exceed MaxCommandBytesPerUser={most_bytes}."
                    " Nothing was started."
                ),
            )

    def _announce(self, status: UnitStatus, event: Event) -> None:
        """The event of a new model; then, if it already ended before its start returned, its exit like any."""
        self._emit(event)
        if status.active_state in ("inactive", "failed"):
            self._unit_changed(status)

    async def stop(self, name: str, reason: str = "", why: str = "") -> None:
        """`reason` and `why`: a stop the daemon decided itself (a policy), said in its event."""
        model = self.get(name)
        async with self._cutting_agent_waits(name), model.lock:
            if model.state in ENDED:
                return
            t0 = time.monotonic()
            # A frozen unit is stopped as it is: systemd thaws it to deliver the kill, and a checkpointed
            # CUDA process dies like any other, releasing its host-RAM snapshot with it.
            self._stopping.add(name)
            self._persist()
            try:
                await self._stop_wake(name)
                await self.units.stop(model.unit)
            finally:
                self._stopping.discard(name)
            self._drop_parked(name)
            model.clear_runtime()
            self._set_state(model, State.STOPPED)
        self._emit(events.stopped(model, int((time.monotonic() - t0) * 1e6), reason, why))

    @contextlib.asynccontextmanager
    async def _cutting_agent_waits(self, name: str) -> AsyncIterator[None]:
        """While a Stop waits for the model and runs: a freeze or thaw waiting on the model's agents gives up at
        once (_agent_wait), rather than the Stop waiting behind it for the agents' deadline."""
        self._stop_requested.add(name)
        wait = self._agent_waits.get(name)
        if wait is not None:
            wait.cancel()
        try:
            yield
        finally:
            self._stop_requested.discard(name)

    def _close_wake(self, model: Model) -> str:
        """A model that ended by itself takes its public port with it: the proxy would keep every client waiting
        for a model that never runs again (a new Run of the name opens the port again). Returns what the exit's
        event says about it."""
        if not model.port:
            return ""

        async def close() -> None:
            if self.models.get(model.name) is not model or model.state not in ENDED:
                return  # the name was run again meanwhile: its wake units are the new model's
            try:
                await self._stop_wake(model.name)
            except GpuschedError as e:
                log.warning("closing the public port of %s, which ended: %s", model.name, e)

        self._spawn(close)
        return f"; its public port {model.port} is closed"

    async def _stop_wake(self, name: str) -> None:
        """Stop a model's wake-on-connection socket and proxy, if it has them (none: nothing happens)."""
        if isinstance(self.units, WakeCapable):
            await self.units.stop_wake(name)

    async def forget(self, name: str) -> None:
        """Stop managing a model; its unit keeps running, untouched."""
        model = self.get(name)
        async with model.lock:
            require(model, "forget")
            if model.catalog_digest and model.state not in ENDED:
                # Its unit would run on unmanaged while the catalog lists the name again: stop it instead.
                raise InvalidState(f"model {name!r} is the model catalog's: stop it; an ended one may be forgotten")
            self._persist()  # a retry now: a Forget the table cannot keep would be undone by a restart
            if self.state_file is not None and self.state_file.error:
                raise GpuschedError(f"cannot forget {name!r} now: {self.state_file.error}")
            await self._stop_wake(name)  # its public port goes: nobody would thaw it any more
            if model.state not in ENDED and model.main_pid:
                self._forgotten[model.unit] = model.main_pid  # a restart must not take it over again
            self._remove(model)
            if model_name_from_unit(model.unit) is None:
                self.units.untrack(model.unit)
        runs_on = "" if model.state in ENDED else "; its unit runs on"
        self._emit(events.forgotten(model, runs_on))
