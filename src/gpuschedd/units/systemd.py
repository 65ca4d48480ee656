"""The `systemd` unit backend: models are transient services started through PID 1's D-Bus API.

We Subscribe() before starting jobs so JobRemoved is delivered, and collect every JobRemoved as it arrives
(a job may finish before StartTransientUnit's reply reaches us). Unit exits are learned from the units'
PropertiesChanged signals, so a crashed model is never left reported as running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import sys
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from .. import validate
from ..errors import InvalidArgs, UnitFailed
from ..names import bus_label_unescape
from ..sysbus import call
from . import DEFAULT_PATH, UnitSpec, UnitStatus, UnitWatcher, cgroup

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
# What status() and start() read of a unit; and the errors that mean it is not there (any more).
_UNIT_PROPERTIES = ("ActiveState", "FreezerState")
_SERVICE_PROPERTIES = ("MainPID", "ExecMainPID", "User", "ExecStart", "Result", "ControlGroup")
_GONE = ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.UnknownObject")
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
OUR_UNIT_PREFIX = "gpusched-"  # gpusched-model@NAME.service, gpusched-adopt-NAME.scope
_MAX_FINISHED_JOBS = 256


def wake_units(name: str) -> tuple[str, str]:
    """The socket and the proxy service of a model's public port (wake on first connection)."""
    return f"gpusched-wake@{name}.socket", f"gpusched-wake@{name}.service"


def resolve_executable(argv0: str, working_directory: str) -> str:
    """systemd wants an absolute ExecStart path; resolve the way systemd-run does, against PID 1's PATH."""
    if "/" in argv0:
        path = argv0 if argv0.startswith("/") else os.path.join(working_directory or "/", argv0)
        return os.path.normpath(path)
    found = shutil.which(argv0, path=DEFAULT_PATH)
    if found is None:
        raise InvalidArgs(f"command not found in {DEFAULT_PATH}: {validate.shown(argv0)}")
    return found


class SystemdUnits:
    name = "systemd"

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._jobs: dict[str, asyncio.Future[str]] = {}  # jobs we wait for
        # Results of jobs that ended before we started waiting for them (a job may end before StartUnit's reply
        # reaches us). Every job on the system passes through here, so only the latest few are kept.
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._watchers: list[UnitWatcher] = []
        self._tracked: set[str] = set()  # adopted units, watched though their names are not ours
        self._tasks: set[asyncio.Task[None]] = set()
        # Each service's cgroup directory as its last status gave it (systemd's ControlGroup under the cgroup v2
        # mount), so a freeze reads the unit's processes from the kernel's files instead of asking PID 1 twice.
        self._cgroup_mount = ""
        self._cgroups: dict[str, str] = {}

    async def setup(self) -> None:
        self._cgroup_mount = cgroup.cgroup2_mount() or ""
        for rule in (
            f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'",
            f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',member='PropertiesChanged',"
            f"path_namespace='/org/freedesktop/systemd1/unit',arg0='{UNIT_IFACE}'",
        ):
            await call(
                self.bus,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
            )
        self.bus.add_message_handler(self._on_message)
        await self._manager("Subscribe")

    async def _manager(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        return await call(self.bus, SYSTEMD, SYSTEMD_PATH, MANAGER, member, signature, body)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "JobRemoved" and msg.interface == MANAGER:
            _id, job_path, _unit, result = msg.body
            fut = self._jobs.get(job_path)
            if fut is None:
                self._finished[job_path] = result
                while len(self._finished) > _MAX_FINISHED_JOBS:
                    self._finished.popitem(last=False)
            elif not fut.done():
                fut.set_result(result)
        elif msg.member == "PropertiesChanged" and msg.path and msg.path.startswith(UNIT_PATH_PREFIX):
            changed = msg.body[1]
            unit = bus_label_unescape(msg.path[len(UNIT_PATH_PREFIX) :])
            # Only our own units concern the engine; the rest of the system's units come and go unheard.
            if (
                (unit.startswith(OUR_UNIT_PREFIX) or unit in self._tracked)
                and "ActiveState" in changed
                and changed["ActiveState"].value in ("inactive", "failed")
            ):
                task = asyncio.ensure_future(self._notify(unit))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _notify(self, unit: str) -> None:
        try:
            status = await self.status(unit) or UnitStatus(unit, "inactive", 0, [], False)
        except UnitFailed as e:
            log.warning("%s", e)
            return
        for watcher in self._watchers:
            watcher(status)

    async def _wait_job(self, job_path: str, what: str) -> None:
        result = self._finished.pop(job_path, None)
        if result is None:
            fut = self._jobs[job_path] = asyncio.get_running_loop().create_future()
            try:
                result = await asyncio.wait_for(fut, timeout=120)
            finally:
                self._jobs.pop(job_path, None)
        if result != "done":
            raise UnitFailed(f"{what}: job {result}")

    # ----------------------------------------------------------------- UnitBackend

    def watch(self, callback: UnitWatcher) -> None:
        self._watchers.append(callback)

    def track(self, unit: str) -> None:
        self._tracked.add(unit)

    def untrack(self, unit: str) -> None:
        self._tracked.discard(unit)

    async def start_scope(
        self, unit: str, pids: list[int], description: str, slice: str = "gpusched.slice"
    ) -> UnitStatus:
        props: list[list[Any]] = [
            ["Description", Variant("s", description)],
            ["Slice", Variant("s", slice)],
            ["PIDs", Variant("au", pids)],
            ["AddRef", Variant("b", False)],
        ]
        with contextlib.suppress(DBusError):
            await self._manager("ResetFailedUnit", "s", [unit])
        try:
            [job] = await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", props, []])
        except DBusError as e:
            raise UnitFailed(f"systemd refused to start {unit}: {e.text}") from None
        await self._wait_job(job, f"start of {unit}")
        status = await self.status(unit)
        return status or UnitStatus(unit, "inactive", 0, [], False)

    async def start(self, spec: UnitSpec) -> UnitStatus:
        exe = resolve_executable(spec.argv[0], spec.working_directory)
        props: list[list[Any]] = [
            ["Description", Variant("s", spec.description)],
            ["Slice", Variant("s", spec.slice)],
            ["Type", Variant("s", "exec")],
            # systemd replaces ${NAME} and $NAME in ExecStart='s argv with the unit's environment, and "$$" with "$":
            # every "$" doubled, the program gets its argv as given, as exec from a shell gives it. (ExecStartEx's
            # no-env-expand flag would say it directly, but systemd 252 writes ExecStartEx= into the transient unit
            # file, which its own parser rejects on the next daemon-reload, leaving the unit without a command.)
            ["ExecStart", Variant("a(sasb)", [[exe, [arg.replace("$", "$$") for arg in spec.argv], False]])],
            ["AddRef", Variant("b", False)],
        ]
        if spec.working_directory:
            props.append(["WorkingDirectory", Variant("s", spec.working_directory)])
        if spec.environment:
            props.append(["Environment", Variant("as", spec.environment)])
        # Always a User=, root's too: systemd sets HOME, USER, LOGNAME and SHELL only for a unit with one, and a
        # program run as root expects them as much as one run as alice (docs/models.md).
        props.append(["User", Variant("s", spec.user or "root")])
        if spec.runtime_directory:
            props.append(["RuntimeDirectory", Variant("as", [os.path.relpath(spec.runtime_directory, "/run")])])
        # A failed unit of the same name (an earlier run of this model) would block the name.
        with contextlib.suppress(DBusError):
            await self._manager("ResetFailedUnit", "s", [spec.unit])
        try:
            [job] = await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))", [spec.unit, "fail", props, []])
        except DBusError as e:
            raise UnitFailed(f"systemd refused to start {spec.unit}: {e.text}") from None
        try:
            await self._wait_job(job, f"start of {spec.unit}")
        except UnitFailed:
            # With Type=exec the job fails both when the command cannot be executed and when it ran but ended
            # before systemd saw the exec succeed. The second is a model that ran and ended: report it so.
            props = await self._properties(spec.unit)
            if not props or not props.get("ExecMainPID") or not props["ExecMainPID"].value:
                raise
        status = await self.status(spec.unit)
        if status is None:
            return UnitStatus(spec.unit, "inactive", 0, [], False)
        return status

    async def start_wake(self, name: str, port: int, backend_port: int, user: str, address: str = "") -> None:
        """Wake on first connection: gpusched-wake@NAME.socket listens on the public port (systemd owns it, the
        daemon has no network) and starts gpusched-wake@NAME.service, the proxy (gpuschedd.wake) as `user`."""
        socket_unit, service_unit = wake_units(name)
        pydir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = f"import sys; sys.path.insert(0, {pydir!r}); from gpuschedd.wake import main; sys.exit(main())"
        argv = [sys.executable, "-I", "-c", code, name, str(backend_port)]
        service: list[list[Any]] = [
            ["Description", Variant("s", f"gpusched wake-on-connection proxy of model {name}")],
            ["Slice", Variant("s", "gpusched.slice")],
            ["ExecStart", Variant("a(sasb)", [[sys.executable, argv, False]])],
            ["NoNewPrivileges", Variant("b", True)],
            ["ProtectSystem", Variant("s", "strict")],
            ["PrivateTmp", Variant("b", True)],
            ["RestrictAddressFamilies", Variant("(bas)", [True, ["AF_UNIX", "AF_INET", "AF_INET6"]])],
        ]
        if user:
            service.append(["User", Variant("s", user)])
        listen = f"{address}:{port}" if address else str(port)
        props: list[list[Any]] = [
            ["Description", Variant("s", f"gpusched public port of model {name}")],
            ["Listen", Variant("a(ss)", [["Stream", listen]])],
            ["Accept", Variant("b", False)],
            ["ReusePort", Variant("b", False)],
            ["AddRef", Variant("b", False)],
        ]
        await self.stop_wake(name)
        try:
            [job] = await self._manager(
                "StartTransientUnit", "ssa(sv)a(sa(sv))", [socket_unit, "fail", props, [[service_unit, service]]]
            )
        except DBusError as e:
            raise UnitFailed(f"systemd refused to start {socket_unit}: {e.text}") from None
        await self._wait_job(job, f"start of {socket_unit}")

    async def stop_wake(self, name: str) -> None:
        for unit in wake_units(name):
            await self.stop(unit)

    async def stop(self, unit: str) -> None:
        try:
            [job] = await self._manager("StopUnit", "ss", [unit, "replace"])
        except DBusError as e:
            if e.type == "org.freedesktop.systemd1.NoSuchUnit":
                return
            raise UnitFailed(f"systemd refused to stop {unit}: {e.text}") from None
        await self._wait_job(job, f"stop of {unit}")
        with contextlib.suppress(DBusError):
            await self._manager("ResetFailedUnit", "s", [unit])

    async def freeze(self, unit: str) -> None:
        try:
            await self._manager("FreezeUnit", "s", [unit])
        except DBusError as e:
            raise UnitFailed(f"systemd could not freeze {unit}: {e.text}") from None

    async def thaw(self, unit: str) -> None:
        try:
            await self._manager("ThawUnit", "s", [unit])
        except DBusError as e:
            raise UnitFailed(f"systemd could not thaw {unit}: {e.text}") from None

    async def _properties(self, unit: str) -> dict[str, Variant] | None:
        """The unit's Unit properties we read, plus its Service ones when it is a service (scopes have none). Each is
        asked for with Get, all at once: a GetAll of a service unmarshals some 300 values, which made a status cost
        five times as much (bench/control_plane.py)."""
        try:
            [path] = await self._manager("GetUnit", "s", [unit])
        except DBusError as e:
            if e.type in _GONE:
                return None
            raise UnitFailed(f"systemd could not report {unit}: {e.text}") from None
        wanted = [(UNIT_IFACE, name) for name in _UNIT_PROPERTIES]
        if unit.endswith(".service"):
            wanted += [(SERVICE_IFACE, name) for name in _SERVICE_PROPERTIES]
        replies = await asyncio.gather(
            *(call(self.bus, SYSTEMD, path, PROPERTIES, "Get", "ss", [iface, name]) for iface, name in wanted),
            return_exceptions=True,
        )
        props: dict[str, Variant] = {}
        for (iface, name), reply in zip(wanted, replies, strict=True):
            if isinstance(reply, DBusError):
                if iface == SERVICE_IFACE:
                    continue
                if reply.type in _GONE:
                    return None
                raise UnitFailed(f"systemd could not report {unit}: {reply.text}") from None
            if isinstance(reply, BaseException):
                raise reply
            props[name] = reply[0]
        return props

    async def status(self, unit: str) -> UnitStatus | None:
        props = await self._properties(unit)
        if props is None:
            self._cgroups.pop(unit, None)
            return None
        try:
            [procs] = await self._manager("GetUnitProcesses", "s", [unit])
        except DBusError:
            procs = []  # the unit ended between the two calls

        def get(name: str, default: Any) -> Any:
            return props[name].value if name in props else default

        group = get("ControlGroup", "")
        if group and self._cgroup_mount:
            self._cgroups[unit] = self._cgroup_mount + group
        else:
            self._cgroups.pop(unit, None)

        exec_start = get("ExecStart", [])
        return UnitStatus(
            unit=unit,
            active_state=get("ActiveState", "inactive"),
            main_pid=int(get("MainPID", 0)),
            pids=sorted(int(pid) for _cg, pid, _cmd in procs),
            frozen=get("FreezerState", "running") == "frozen",
            user=get("User", ""),
            command=[arg.replace("$$", "$") for arg in exec_start[0][1]] if exec_start else [],  # as exec gets it
            result=get("Result", "success"),
        )

    async def pids(self, unit: str) -> list[int] | None:
        """The unit's processes alone, None when it is not loaded: from its cgroup's files where its last status
        named its cgroup (no bus round trip), else one GetUnitProcesses (a status is several calls)."""
        group = self._cgroups.get(unit)
        if group is not None:
            try:
                return sorted(cgroup.procs_below(group))
            except OSError:
                del self._cgroups[unit]  # gone (or unreadable): systemd says what became of the unit
        try:
            [procs] = await self._manager("GetUnitProcesses", "s", [unit])
        except DBusError as e:
            if e.type in _GONE:
                return None
            raise UnitFailed(f"systemd could not list the processes of {unit}: {e.text}") from None
        return sorted(int(pid) for _cg, pid, _cmd in procs)

    async def list_units(self, prefix: str) -> list[UnitStatus]:
        [units] = await self._manager("ListUnitsByPatterns", "asas", [[], [prefix + "*"]])
        found = []
        for entry in units:
            status = await self.status(entry[0])
            if status is not None:
                found.append(status)
        return found
