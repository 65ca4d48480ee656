"""A fake GPU for tests: NVML-shaped telemetry over the same state directory as the fake libcuda
(tests/fakecuda/fakecuda.c), plus helpers to set that directory up.

A TEST FAKE. The daemon uses it only when GPUSCHED_FAKE_GPU_DIR names a directory (system tests in the
systemd sandbox); the fake libcuda is then selected with GPUSCHED_LIBCUDA. The file layout is documented at
the top of fakecuda.c; this module and that file must agree.

Like real NVML, a process is listed with its VRAM while it holds a context (running or locked) and
disappears once checkpointed; a GPU's used memory is its processes' VRAM plus foreign allocations."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from ..checkpoint import CudaState
from ..telemetry import GpuInfo

_STATES = {0: CudaState.RUNNING, 1: CudaState.LOCKED, 2: CudaState.CHECKPOINTED, 3: CudaState.FAILED}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class FakeContext:
    pid: int
    vram: int
    gpu: str
    state: CudaState


class FakeGpuDir:
    """The fake driver's state directory: set GPUs up, inject failures, read what happened."""

    def __init__(self, path: str) -> None:
        self.path = path
        for sub in ("ctx", "state", "alloc", "fail", "busy", "broken", "req", "ack", "delay", "util", "hold", "dev"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        # The fake driver's device file, which its CUDA processes hold open as real ones hold /dev/nvidia*: readable
        # and writable by every user, as /dev/nvidiactl is (created here, so no one's umask decides).
        try:
            fd = os.open(self._p("dev", "nvidiactl"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            return
        os.fchmod(fd, 0o666)
        os.close(fd)

    @property
    def devices(self) -> str:
        """The path prefix of the fake driver's device files (GPUSCHED_NVIDIA_DEVICES for the daemon)."""
        return self._p("dev", "nvidia")

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # ---------------------------------------------------------------- set up

    def add_gpu(self, uuid: str, index: int, total_bytes: int, name: str = "Fake H100") -> None:
        with open(self._p("gpus"), "a") as f:
            f.write(f"{uuid} {index} {total_bytes} {name}\n")

    def allocate(self, name: str, nbytes: int, uuid: str) -> None:
        """Something outside gpuschedd takes VRAM on a GPU."""
        _write(self._p("alloc", name), f"{nbytes} {uuid}\n")

    def free(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._p("alloc", name))

    def fail(self, pid: int, step: str, error: str) -> None:
        """Make `step` (lock, checkpoint, restore, unlock, get-state) fail for pid with CUDA_ERROR_..."""
        _write(self._p("fail", f"{pid}.{step}"), error + "\n")

    def clear_failures(self) -> None:
        for name in os.listdir(self._p("fail")):
            os.unlink(self._p("fail", name))

    def delay(self, pid: int | None, step: str, ms: int) -> None:
        """Make `step` (lock, checkpoint, restore, unlock) sleep `ms` milliseconds before it acts, for pid (None:
        every pid): a slow driver, so a test can kill the daemon in the middle of a freeze or a thaw."""
        _write(self._p("delay", f"{pid if pid is not None else 'all'}.{step}"), f"{ms}\n")

    def clear_delays(self) -> None:
        for name in os.listdir(self._p("delay")):
            os.unlink(self._p("delay", name))

    def hold(self, pid: int, step: str) -> None:
        """Keep `step` (checkpoint, restore; park, unpark: an agent's copies) of pid in its copy until release() (30 s
        at most). As on the real driver, a checkpoint holds the process's GPU memory until its copy ends, and a
        restore claims it before its copy: the order of two models' steps then shows whether they overlapped,
        without timing anything."""
        _write(self._p("hold", f"{pid}.{step}"), "\n")

    def release(self, pid: int, step: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._p("hold", f"{pid}.{step}"))

    def clear_holds(self) -> None:
        for name in os.listdir(self._p("hold")):
            os.unlink(self._p("hold", name))

    def busy(self, pid: int, ms: int) -> None:
        """The process cannot be locked for `ms` milliseconds (a long kernel, a held CUDA call)."""
        _write(self._p("busy", str(pid)), f"{ms}\n")

    def utilization(self, pid: int, percent: int) -> None:
        """The SM utilization NVML reports for pid from now on (none set: 0, an idle process)."""
        _write(self._p("util", str(pid)), f"{percent}\n")

    # ---------------------------------------------------------------- read back

    def state(self, pid: int) -> CudaState | None:
        """The fake driver's state of pid, None if it holds no context."""
        if _read(self._p("ctx", str(pid))) is None:
            return None
        text = _read(self._p("state", str(pid)))
        return _STATES[int(text)] if text else CudaState.RUNNING

    def broken(self, pid: int) -> bool:
        return os.path.exists(self._p("broken", str(pid)))

    def corrupted(self) -> list[int]:
        """Processes whose snapshot came back different on a restore (fake_model.py checks every page)."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(int(name) for name in os.listdir(self._p("corrupt")) if name.isdigit())
        return []

    def log(self) -> list[tuple[str, int, str]]:
        """Every driver call so far, in order: (step, pid, result name)."""
        text = _read(self._p("log")) or ""
        out = []
        for line in text.splitlines():
            step, pid, result = line.split()
            out.append((step, int(pid), result))
        return out

    def contexts(self) -> list[FakeContext]:
        """Live processes that registered a context."""
        found = []
        for name in os.listdir(self._p("ctx")):
            if not name.isdigit() or not _alive(int(name)):
                continue
            fields = dict(
                line.split("=", 1) for line in (_read(self._p("ctx", name)) or "").splitlines() if "=" in line
            )
            state = self.state(int(name))
            if state is None:
                continue
            found.append(FakeContext(int(name), int(fields.get("vram", "0")), fields.get("gpu", ""), state))
        return sorted(found, key=lambda c: c.pid)


class FakeGpuTelemetry:
    """GpuTelemetry over a FakeGpuDir, shaped like gpuschedd.nvml.NvmlTelemetry."""

    def __init__(self, path: str) -> None:
        self.dir = FakeGpuDir(path)
        # The fake libcuda in this process reads FAKECUDA_DIR: point it at the same fake GPU.
        os.environ.setdefault("FAKECUDA_DIR", path)

    def _holding(self) -> list[FakeContext]:
        return [c for c in self.dir.contexts() if c.state in (CudaState.RUNNING, CudaState.LOCKED)]

    def gpus(self) -> list[GpuInfo]:
        text = _read(self.dir._p("gpus")) or ""
        holding = self._holding()
        allocs = []
        for name in os.listdir(self.dir._p("alloc")):
            if "." in name:
                continue
            parts = (_read(self.dir._p("alloc", name)) or "").split()
            if len(parts) == 2:
                allocs.append((int(parts[0]), parts[1]))
        out = []
        for line in text.splitlines():
            uuid, index, total, *name = line.split()
            used = sum(c.vram for c in holding if c.gpu == uuid) + sum(b for b, u in allocs if u == uuid)
            total_bytes = int(total)
            out.append(GpuInfo(uuid, int(index), " ".join(name), total_bytes, used, max(0, total_bytes - used)))
        return sorted(out, key=lambda g: g.index)

    def vram_by_pid(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for c in self._holding():
            per = out.setdefault(c.pid, {})
            per[c.gpu] = per.get(c.gpu, 0) + c.vram
        return out

    def busy_pids(self) -> set[int] | None:
        """Processes holding a context whose util/PID file says above 0 (a checkpointed one runs nothing)."""
        busy = set()
        for c in self._holding():
            text = _read(self.dir._p("util", str(c.pid)))
            if text and text.isdigit() and int(text) > 0:
                busy.add(c.pid)
        return busy
