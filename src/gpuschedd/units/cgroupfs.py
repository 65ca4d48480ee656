"""The `cgroupfs` unit backend: each model in its own cgroup v2 group, for hosts whose PID 1 is not systemd
(containers, the GPU test machine).

A unit is the directory `<root>/<unit name>`; the kernel's files are the truth, so a restarted daemon finds
its models by listing the root. The group gets no controllers; it is only used to hold the processes,
freeze them (`cgroup.freeze`, done when `cgroup.events` says `frozen 1`) and kill them (`cgroup.kill`).
Like a systemd service with KillMode=control-group, the unit ends when its main process exits: whatever
is left in the group is killed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time

from .. import validate
from ..errors import UnitFailed
from ..procfs import cmdline, ppid, process_uid
from . import DEFAULT_PATH, UnitSpec, UnitStatus, UnitWatcher, cgroup

log = logging.getLogger(__name__)


# The main process starts as this shim: it waits on stdin until the daemon has moved it into the group, enters
# the working directory as the unit's user (as systemd does: no directory the user could not reach), then
# becomes argv with stdin /dev/null. So no code of the model ever runs outside its group.
_SHIM = 'read -r _; cd -- "$1" || exit 200; shift; exec "$@" </dev/null'
_SHIM_NAME = "gpusched-shim"
_EXIT_NO_CWD, _EXIT_NO_EXEC = 200, (126, 127)


def _result(returncode: int) -> str:
    """systemd's Result= names for how a main process ended."""
    if returncode == 0:
        return "success"
    return "signal" if returncode < 0 else "exit-code"


class CgroupfsUnits:
    name = "cgroupfs"

    def __init__(self, root: str, log_dir: str | None = None, stop_timeout: float = 10.0) -> None:
        """root: the directory (inside a cgroup2 mount) that holds one group per unit. log_dir: where each unit's
        stdout and stderr go as <unit>.log; None sends them to the daemon's own (the journal, under systemd).
        stop_timeout: seconds between SIGTERM and SIGKILL on stop."""
        self.root = root
        self.log_dir = log_dir
        self.stop_timeout = stop_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # units this daemon started
        self._main: dict[str, int] = {}
        self._ended: dict[str, UnitStatus] = {}  # units whose end was seen and not yet reported gone
        self._watchers: list[UnitWatcher] = []
        self._known: dict[str, str] = {}  # unit → last active_state reported to watchers
        self._runtime: dict[str, str] = {}  # unit → its runtime directory, removed on stop
        self._poller: asyncio.Task[None] | None = None

    def _group(self, unit: str) -> str:
        if "/" in unit or unit in ("", ".", ".."):
            raise UnitFailed(f"invalid unit name {unit!r}")
        return os.path.join(self.root, unit)

    # ---------------------------------------------------------------- set-up

    async def setup(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.root))
        mount = cgroup.cgroup2_mount()
        if not os.path.exists(os.path.join(parent, "cgroup.procs")) and mount:
            # A hybrid host mounts cgroup2 at /sys/fs/cgroup/unified: keep the name, use the v2 hierarchy.
            moved = os.path.join(mount, os.path.basename(self.root))
            log.warning("%s is not in the cgroup v2 hierarchy; using %s", self.root, moved)
            self.root = moved
        os.makedirs(self.root, exist_ok=True)
        if not os.path.exists(os.path.join(self.root, "cgroup.procs")):
            raise UnitFailed(f"{self.root} is not in a cgroup v2 hierarchy (cgroup2 is at {cgroup.cgroup2_mount()})")
        if not os.path.exists(os.path.join(self.root, "cgroup.freeze")) and os.path.realpath(
            self.root
        ) != os.path.realpath(cgroup.cgroup2_mount() or ""):
            raise UnitFailed(f"{self.root}: the kernel has no cgroup v2 freezer (needs Linux 5.2)")
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)

    # ---------------------------------------------------------------- start

    def _environment(self, spec: UnitSpec) -> dict[str, str]:
        """A clean environment like systemd gives a service, plus the user's identity and spec.environment."""
        env = {"PATH": DEFAULT_PATH, "LANG": os.environ.get("LANG", "C.UTF-8")}
        if spec.user:
            pw = pwd.getpwnam(spec.user)
            env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir, SHELL=pw.pw_shell)
        for item in spec.environment:
            key, sep, value = item.partition("=")
            if sep and key:
                env[key] = value
        return env

    async def start(self, spec: UnitSpec) -> UnitStatus:
        group = self._group(spec.unit)
        if cgroup.procs(group):
            raise UnitFailed(f"unit {spec.unit} already exists")
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(group)
        try:
            os.mkdir(group)
        except OSError as e:
            raise UnitFailed(f"cannot create cgroup {group}: {e.strerror}") from None
        user: dict[str, object] = {}
        if spec.user:
            try:
                pw = pwd.getpwnam(spec.user)
            except KeyError:
                cgroup.rmdir(group)
                raise UnitFailed(f"no such user: {spec.user}") from None
            user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid)}
        if spec.runtime_directory:
            # As systemd's RuntimeDirectory=: a fresh directory owned by the unit's user.
            shutil.rmtree(spec.runtime_directory, ignore_errors=True)
            os.makedirs(spec.runtime_directory, mode=0o755)
            if spec.user:
                os.chown(spec.runtime_directory, user["user"], user["group"])  # type: ignore[arg-type]
            self._runtime[spec.unit] = spec.runtime_directory
        out: int | None = None
        if self.log_dir:
            out = os.open(os.path.join(self.log_dir, f"{spec.unit}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", _SHIM, _SHIM_NAME, spec.working_directory or "/", *spec.argv],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=out,
                cwd="/",
                env=self._environment(spec),
                start_new_session=True,
                **user,  # type: ignore[arg-type]
            )
        except OSError as e:
            cgroup.rmdir(group)
            raise UnitFailed(f"cannot start {validate.shown(spec.argv[0])}: {e.strerror}") from None
        finally:
            if out is not None:
                os.close(out)
        assert proc.stdin is not None
        try:
            cgroup.attach(group, proc.pid)
        except OSError as e:
            proc.kill()
            proc.stdin.close()
            proc.wait()
            cgroup.rmdir(group)
            raise UnitFailed(f"cannot move pid {proc.pid} into {group}: {e.strerror}") from None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        await self._wait_exec(spec, proc, group)
        self._children[spec.unit] = proc
        self._main[spec.unit] = proc.pid
        self._ended.pop(spec.unit, None)
        self._known[spec.unit] = "active"
        log.info("started %s as pid %d in %s", spec.unit, proc.pid, group)
        status = await self.status(spec.unit)
        assert status is not None
        return status

    async def _wait_exec(self, spec: UnitSpec, proc: subprocess.Popen[bytes], group: str, timeout: float = 5.0) -> None:
        """Return once the shim has become the model (like systemd's Type=exec): a start then reports the model's
        own command line, and a program that cannot run fails the start instead of a later watch event."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                if code == _EXIT_NO_CWD or code in _EXIT_NO_EXEC:
                    cgroup.kill(group)
                    await cgroup.wait_empty(group, 5.0)
                    cgroup.rmdir(group)
                    what = (
                        f"enter {validate.shown(spec.working_directory)}"
                        if code == _EXIT_NO_CWD
                        else f"execute {validate.shown(spec.argv[0])}"
                    )
                    raise UnitFailed(f"{spec.unit}: cannot {what} (as {spec.user or 'root'})")
                return
            argv = cmdline(proc.pid)  # empty once the shim has exited: poll() reaps it next round
            if argv and (len(argv) < 4 or argv[3] != _SHIM_NAME):
                return
            await asyncio.sleep(0.001)
        log.warning(
            "%s: pid %d has not exec'd %s after %.0fs", spec.unit, proc.pid, validate.shown(spec.argv[0]), timeout
        )

    # ---------------------------------------------------------------- freeze / thaw

    async def _set_frozen(self, unit: str, frozen: bool, timeout: float = 10.0) -> None:
        try:
            done = await cgroup.set_frozen(self._group(unit), frozen, timeout)
        except FileNotFoundError:
            raise UnitFailed(f"unit {unit} does not exist") from None
        if not done:
            raise UnitFailed(f"unit {unit} did not {'freeze' if frozen else 'thaw'} within {timeout:.0f}s")

    async def freeze(self, unit: str) -> None:
        if not cgroup.procs(self._group(unit)):
            raise UnitFailed(f"unit {unit} is not active")
        await self._set_frozen(unit, True)

    async def thaw(self, unit: str) -> None:
        await self._set_frozen(unit, False)

    # ---------------------------------------------------------------- stop

    async def stop(self, unit: str) -> None:
        group = self._group(unit)
        if not os.path.isdir(group):
            return
        # A frozen process cannot act on SIGTERM: thaw first, as systemd does before it kills a frozen unit.
        if cgroup.events(group).get("frozen") == "1":
            await self._set_frozen(unit, False)
        cgroup.signal_all(group, signal.SIGTERM)
        if not await cgroup.wait_empty(group, self.stop_timeout):
            cgroup.kill(group)
            if not await cgroup.wait_empty(group, 10.0):
                raise UnitFailed(f"unit {unit}: processes survive SIGKILL: {cgroup.procs(group)}")
        self._reap(unit)
        cgroup.rmdir(group)
        if unit in self._runtime:
            shutil.rmtree(self._runtime.pop(unit), ignore_errors=True)
        self._known.pop(unit, None)
        self._ended.pop(unit, None)
        self._main.pop(unit, None)

    def _reap(self, unit: str) -> int | None:
        proc = self._children.pop(unit, None)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._children[unit] = proc
            return None

    # ---------------------------------------------------------------- status

    def _main_pid(self, unit: str, pids: list[int]) -> int:
        main = self._main.get(unit)
        if main in pids:
            return main
        # After a daemon restart: the process whose parent is outside the group is the tree's root.
        roots = [p for p in pids if ppid(p) not in pids]
        main = min(roots or pids)
        self._main[unit] = main
        return main

    async def status(self, unit: str) -> UnitStatus | None:
        group = self._group(unit)
        if unit in self._ended:
            return self._ended[unit]
        if not os.path.isdir(group):
            return None
        pids = cgroup.procs(group)
        events = cgroup.events(group)
        if not pids:
            return UnitStatus(unit, "inactive", 0, [], False)
        main = self._main_pid(unit, pids)
        uid = process_uid(main)
        try:
            user = pwd.getpwuid(uid).pw_name if uid not in (None, 0) else ""
        except KeyError:
            user = ""
        return UnitStatus(
            unit=unit,
            active_state="active",
            main_pid=main,
            pids=pids,
            frozen=events.get("frozen") == "1",
            user=user,
            command=cmdline(main),
        )

    async def list_units(self, prefix: str) -> list[UnitStatus]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.startswith(prefix) and os.path.isdir(os.path.join(self.root, name)):
                status = await self.status(name)
                if status is not None and status.active_state == "active":
                    self._known.setdefault(name, "active")
                    out.append(status)
        return out

    # ---------------------------------------------------------------- watch

    def watch(self, callback: UnitWatcher) -> None:
        self._watchers.append(callback)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def track(self, unit: str) -> None:
        pass  # every group under the root is watched; there are no other units here

    def untrack(self, unit: str) -> None:
        pass

    async def start_scope(
        self, unit: str, pids: list[int], description: str, slice: str = "gpusched.slice"
    ) -> UnitStatus:
        """A group of its own for running processes: each PID is written into its cgroup.procs."""
        group = self._group(unit)
        if cgroup.procs(group):
            raise UnitFailed(f"unit {unit} already exists")
        self._ended.pop(unit, None)
        os.makedirs(group, exist_ok=True)
        try:
            for pid in pids:
                cgroup.attach(group, pid)
        except OSError as e:
            raise UnitFailed(f"cannot move processes into {unit}: {e}") from None
        self._main[unit] = min(pids)
        self._known[unit] = "active"
        status = await self.status(unit)
        return status or UnitStatus(unit, "inactive", 0, [], False)

    def _check_ended(self, unit: str) -> UnitStatus | None:
        """The unit's end, if it ended: its main process (our child) exited, or its group emptied."""
        group = self._group(unit)
        proc = self._children.get(unit)
        code = proc.poll() if proc is not None else None
        if proc is not None and code is None:
            return None
        if proc is None and cgroup.procs(group):
            return None
        if proc is not None:
            # Like KillMode=control-group: the main process is gone, so is the rest of the unit.
            cgroup.kill(group)
            self._children.pop(unit, None)
            result = _result(code if code is not None else 0)
        else:
            # Not our child (the daemon restarted): its exit status is not ours to know.
            result = "unknown"
        state = "inactive" if result == "success" else "failed"
        return UnitStatus(unit, state, 0, [], False, result=result)

    async def _poll(self, interval: float = 0.1) -> None:
        while True:
            await asyncio.sleep(interval)
            for unit in list(self._known):
                if self._known[unit] != "active":
                    continue
                try:
                    ended = self._check_ended(unit)
                except OSError as e:
                    log.warning("watching %s: %s", unit, e)
                    continue
                if ended is None:
                    continue
                self._known[unit] = ended.active_state
                self._ended[unit] = ended
                if await cgroup.wait_empty(self._group(unit), 5.0):
                    cgroup.rmdir(self._group(unit))
                self._main.pop(unit, None)
                for watcher in self._watchers:
                    try:
                        watcher(ended)
                    except Exception:
                        log.exception("unit watcher failed for %s", unit)
