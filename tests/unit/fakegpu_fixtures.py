"""Fixtures for tests that drive the checkpoint backends through the fake libcuda (tests/fakecuda): the
library built once per session with gcc, a fresh driver state directory per test, and fake model processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from counters import moves, still
from polling import wait_until

from gpuschedd import spill
from gpuschedd.agentlink import AgentLink
from gpuschedd.testing.fakegpu import FakeGpuDir

FAKECUDA = Path(__file__).resolve().parent.parent / "fakecuda"
ROOT = FAKECUDA.parent.parent
sys.path.insert(0, str(FAKECUDA))

from build import build  # noqa: E402

GPU0 = "GPU-a1b2c3d4-0000-1111-2222-333344445555"
GPU1 = "GPU-a1b2c3d4-0000-1111-2222-666677778888"
GIB = 1 << 30
MIB = 1 << 20


def mapped(pid: int, address: int) -> bool:
    """Whether `address` lies in a mapping of the process."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


def files_open_in(pid: int, directory: Path, fds: bool = False) -> list[str]:
    """What the process's open descriptors name under `directory` (an unlinked file shows " (deleted)"); fds: their
    /proc/PID/fd/N paths instead."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(directory) + "/"):
                out.append(f"/proc/{pid}/fd/{fd}" if fds else target)
    return out


def inherited_by_exec(pid: int, directory: Path) -> list[str]:
    """The process's descriptors under `directory` without close-on-exec: a program it runs would hold them too."""
    out = []
    for path in files_open_in(pid, directory, fds=True):
        with contextlib.suppress(OSError):
            flags = Path(path.replace("/fd/", "/fdinfo/")).read_text().split("flags:", 1)[1].split()[0]
            if not int(flags, 8) & os.O_CLOEXEC:
                out.append(path)
    return out


async def spill_parked(link: AgentLink, directory: Path) -> None:
    """What the daemon's page-out does with an agent's parked bytes: written to a file of its own in `directory`,
    then the agent handed the file (spill.py)."""
    fd = spill.spill_area(str(directory), link.pid, link.host_address, link.parked_bytes)
    try:
        await link.spill(fd, 5.0)
    finally:
        os.close(fd)


def scribble_over_spill_file(pid: int, directory: Path, size: int) -> None:
    """Overwrite the first `size` bytes of the spill file that process `pid` holds (the daemon's, unlinked): what
    the process reads of them from the file from now on is garbage."""
    [name] = files_open_in(pid, directory, fds=True)
    fd = os.open(name, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xa5" * size, 0)
    finally:
        os.close(fd)


def lazily_freed(pid: int, address: int | None = None) -> int:
    """Bytes of a process's memory given back with MADV_FREE and not yet taken by the kernel: all of it, or that
    of the mapping holding `address` (other memory freed meanwhile does not count)."""
    if address is None:
        lines, inside = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines(), True
    else:
        lines, inside = Path(f"/proc/{pid}/smaps").read_text().splitlines(), False
    for line in lines:
        head = line.split()[0] if line.strip() else ""
        if address is not None and "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "LazyFree:":
            return int(line.split()[1]) * 1024
    raise AssertionError("no LazyFree in " + ("smaps_rollup" if address is None else f"the mapping at {address:#x}"))


@pytest.fixture(scope="session")
def fakecuda_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("no C compiler for the fake libcuda")
    out = tmp_path_factory.mktemp("fakecuda")
    build(str(out), checkpoint_api=False)
    return Path(build(str(out)))


@pytest.fixture(scope="session")
def preload_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transparent fast path's interposer (native/preload), built as the packages build it."""
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("no gcc or make to build the interposer")
    out = tmp_path_factory.mktemp("preload")
    subprocess.run(["make", "-s", "-C", str(ROOT), "preload", f"PRELOAD_OUT={out}", "CFLAGS=-Werror"], check=True)
    return out / "libgpuschedd-preload.so"


@pytest.fixture(scope="session")
def preload_program(fakecuda_lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/fakecuda/preload_prog.c: an unmodified "CUDA program" of the fake libcuda, linked with it."""
    out = tmp_path_factory.mktemp("preload-prog") / "preload_prog"
    cmd = ["gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(out), str(FAKECUDA / "preload_prog.c")]
    subprocess.run([*cmd, f"-L{fakecuda_lib.parent}", "-l:libcuda.so.1", "-ldl", "-lpthread"], check=True)
    return out


@pytest.fixture
def gpu_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fakecuda_lib: Path) -> FakeGpuDir:
    """A fresh fake driver with two 1 GiB GPUs; the fake libcuda and its helpers find it through the env, and the
    checkpoint backends its device files (which its CUDA processes hold open)."""
    path = tmp_path / "fakecuda"
    monkeypatch.setenv("FAKECUDA_DIR", str(path))
    monkeypatch.setenv("GPUSCHED_LIBCUDA", str(fakecuda_lib))
    fake = FakeGpuDir(str(path))
    monkeypatch.setenv("GPUSCHED_NVIDIA_DEVICES", fake.devices)
    fake.add_gpu(GPU0, 0, GIB)
    fake.add_gpu(GPU1, 1, GIB)
    return fake


@dataclass
class FakeModel:
    """A running fake_model.py: `pids` are its CUDA processes in start order, `counter` its work file."""

    proc: subprocess.Popen[bytes]
    counter: Path
    pids: list[int] = field(default_factory=list)

    def count(self, i: int = 0) -> int:
        path = self.counter if i == 0 else Path(f"{self.counter}.{i}")
        try:
            return int(path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def moves(self, i: int = 0) -> bool:
        return moves(lambda: self.count(i))

    def still(self, i: int = 0) -> bool:
        return still(lambda: self.count(i))


def fake_model_argv(gpu_dir: FakeGpuDir, counter: Path, vram: int, gpu: str = GPU0, procs: int = 1) -> list[str]:
    return [
        sys.executable,
        str(FAKECUDA / "fake_model.py"),
        "--dir",
        gpu_dir.path,
        "--vram",
        str(vram),
        "--gpu",
        gpu,
        "--counter",
        str(counter),
        "--procs",
        str(procs),
    ]


def registered(gpu_dir: FakeGpuDir, count: int) -> list[int] | None:
    pids = [c.pid for c in gpu_dir.contexts()]
    return pids if len(pids) >= count else None


@pytest.fixture
def spawn_model(gpu_dir: FakeGpuDir, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """spawn_model(vram, procs=1, gpu=GPU0) → FakeModel, killed (the whole session) at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(vram: int = 64 * MIB, procs: int = 1, gpu: str = GPU0) -> FakeModel:
        counter = tmp_path / f"counter{len(started)}"
        before = {c.pid for c in gpu_dir.contexts()}
        proc = subprocess.Popen(fake_model_argv(gpu_dir, counter, vram, gpu, procs), start_new_session=True)
        started.append(proc)
        pids = wait_until(
            "fake model registration",
            lambda: [p for p in (registered(gpu_dir, len(before) + procs) or []) if p not in before],
        )
        model = FakeModel(proc, counter, sorted(pids, key=lambda p: (p != proc.pid, p)))
        wait_until("fake model counting", lambda: model.count() > 0)
        return model

    yield spawn
    for proc in started:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)
        proc.wait()


# What another user sees knocking at an agent's socket (the Python agent's or the interposer's): "refused" when the
# listener hung up on it, "served" when it answered a park.
_STRANGER_PROBE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
    "try:\n"
    '    s.sendall(b\'{"op": "park", "timeout_ms": 1000}\\n\')\n'
    "    print('refused' if s.recv(4096) == b'' else 'served')\n"
    "except (BrokenPipeError, ConnectionResetError):\n"
    "    print('refused')\n"
)


def park_as_nobody(path: str) -> subprocess.CompletedProcess[str]:
    """Ask the agent listening at `path` to park, as user nobody (uid 65534). The interpreter by its real path, and
    isolated, from /: nobody may not enter the checkout (a clone in root's 0700 home, as on a fresh machine)."""
    argv = [os.path.realpath(sys.executable), "-I", "-c", _STRANGER_PROBE, path]
    return subprocess.run(argv, user=65534, capture_output=True, text=True, timeout=30, cwd="/")
