"""The transparent fast path's interposer (native/preload) in an unmodified C program (tests/fakecuda/preload_prog.c)
over the fake libcuda, parked and unparked by the daemon's own AgentLink: the memory is released and comes back
intact at the same addresses, launches wait at the gate while parked, and every failure leaves the program as it
was. Built with gcc (the library through `make preload`, as the packages build it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from counters import amoves, astill
from fakegpu_fixtures import (
    GPU0,
    MIB,
    files_open_in,
    inherited_by_exec,
    lazily_freed,
    mapped,
    park_as_nobody,
    scribble_over_spill_file,
    spill_parked,
)
from polling import wait_until

from gpuschedd.agent.protocol import socket_path
from gpuschedd.agentlink import AgentFailed, AgentLink
from gpuschedd.testing.fakegpu import FakeGpuDir

THREADS = 4
PARKED = THREADS * 4 * MIB + 8 * MIB  # 3 MiB buffers round up to 4; the 8 MiB one; the 4 KiB one stays with the driver
SMALL = 2 * MIB  # the driver's own cuMemAlloc of 4 KiB, rounded to its page


class Program:
    """A running preload_prog: its threads launch fake kernels until stop()."""

    def __init__(self, argv: list[str], env: dict[str, str], agent_dir: str) -> None:
        self.dir = agent_dir
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("ready"), "the program started"
        self.pid = self.proc.pid

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def count(self) -> int:
        return int(self._ask("count"))

    async def link(self) -> AgentLink:
        link = await AgentLink.connect(self.dir, self.pid, 5.0)
        assert link is not None, "the interposer listens"
        return link

    def stop(self) -> str:
        """Stop the threads; every byte of every buffer checked: "intact", or what differs."""
        out, _ = self.proc.communicate("stop\n", timeout=30)
        return out.strip().splitlines()[-1] + f" (exit {self.proc.returncode})"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def program_env(preload_lib: Path, fakecuda_lib: Path, agent_dir: str | None, **extra: str) -> dict[str, str]:
    """The environment of a program the interposer is injected into, over the fake libcuda."""
    env = dict(os.environ, LD_PRELOAD=str(preload_lib), LD_LIBRARY_PATH=str(fakecuda_lib.parent), **extra)
    env.pop("GPUSCHED_AGENT_DIR", None)
    return env if agent_dir is None else dict(env, GPUSCHED_AGENT_DIR=agent_dir)


@pytest.fixture
def prog(
    gpu_dir: FakeGpuDir, preload_lib: Path, preload_program: Path, fakecuda_lib: Path, tmp_path: Path
) -> Iterator[Program]:
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    p = Program(
        [str(preload_program), GPU0, str(THREADS)],
        program_env(preload_lib, fakecuda_lib, str(agent_dir)),
        str(agent_dir),
    )
    yield p
    p.kill()


def vram(gpu_dir: FakeGpuDir, pid: int) -> int:
    return next(c.vram for c in gpu_dir.contexts() if c.pid == pid)


async def test_park_releases_the_memory_holds_the_launches_and_unpark_restores_it(
    prog: Program, gpu_dir: FakeGpuDir
) -> None:
    assert vram(gpu_dir, prog.pid) == PARKED + SMALL
    link = await prog.link()
    for _ in range(3):
        assert await amoves(prog.count)
        assert await link.park(5000) == PARKED
        assert vram(gpu_dir, prog.pid) == SMALL, "what cuMemAlloc gave is released; the driver's small one stays"
        assert await astill(prog.count), "every launching thread waits at the gate"
        await link.unpark(5.0)
        assert vram(gpu_dir, prog.pid) == PARKED + SMALL
    assert await amoves(prog.count)
    link.close()
    assert prog.stop() == "intact (exit 0)", "every byte is what the launches made it, at the same addresses"


async def test_when_the_daemon_goes_away_the_program_unparks_by_itself(prog: Program, gpu_dir: FakeGpuDir) -> None:
    link = await prog.link()
    await link.park(5000)
    assert await astill(prog.count)
    link.close()
    assert await amoves(prog.count)
    assert vram(gpu_dir, prog.pid) == PARKED + SMALL
    assert prog.stop() == "intact (exit 0)"


@pytest.mark.parametrize(("step", "why"), [("memcpy", "nothing was released"), ("mem-unmap", "mapped back")])
async def test_a_failed_park_answers_so_and_leaves_the_program_as_it_was(
    prog: Program, gpu_dir: FakeGpuDir, step: str, why: str
) -> None:
    link = await prog.link()
    gpu_dir.fail(prog.pid, step, "CUDA_ERROR_ILLEGAL_STATE")
    with pytest.raises(AgentFailed, match=why) as failed:
        await link.park(5000)
    assert failed.value.answered, "the interposer itself answered: the daemon takes the driver path"
    gpu_dir.clear_failures()
    assert vram(gpu_dir, prog.pid) == PARKED + SMALL
    assert await amoves(prog.count), "the gate is open again"
    assert await link.park(5000) == PARKED, "and a later park works"
    await link.unpark(5.0)
    link.close()
    assert prog.stop() == "intact (exit 0)"


async def test_the_park_keeps_its_pinned_buffers_for_the_unpark_and_no_longer(
    prog: Program, gpu_dir: FakeGpuDir
) -> None:
    """The unpark copies through the bounce buffers the park registered (no registration on the thaw's path); once
    it is over they are gone, so the next park registers its own."""
    link = await prog.link()
    assert await link.park(5000) == PARKED
    threads = min(16, max(2, os.sysconf("SC_NPROCESSORS_ONLN")), THREADS + 2)  # at most one per 4 MiB piece
    assert link.staging_bytes == threads * 2 * 4 * MIB, "two pinned 4 MiB buffers per copy thread, reported"
    gpu_dir.fail(prog.pid, "host-register", "CUDA_ERROR_OUT_OF_MEMORY")
    await link.unpark(5.0)  # would fail at cuMemHostRegister had the ring not been kept
    assert vram(gpu_dir, prog.pid) == PARKED + SMALL and await amoves(prog.count)
    with pytest.raises(AgentFailed, match=r"cuMemHostRegister.*nothing was released"):
        await link.park(5000)
    gpu_dir.clear_failures()
    assert await link.park(5000) == PARKED
    await link.unpark(5.0)
    link.close()
    assert prog.stop() == "intact (exit 0)"


@pytest.mark.parametrize("keep", ["1", "0"])
async def test_the_unparked_host_memory_is_given_back_lazily_for_the_next_park(
    gpu_dir: FakeGpuDir, preload_lib: Path, preload_program: Path, fakecuda_lib: Path, tmp_path: Path, keep: str
) -> None:
    """After an unpark the parked bytes' host memory is MADV_FREE'd, not unmapped: the next park writes into it
    without faulting in fresh zeroed pages (the copy out's bound on the H200), and the kernel takes it whenever it
    wants memory. GPUSCHED_PRELOAD_KEEP_HOST=0 unmaps it."""
    env = program_env(preload_lib, fakecuda_lib, str(tmp_path), GPUSCHED_PRELOAD_KEEP_HOST=keep)
    prog = Program([str(preload_program), GPU0, str(THREADS)], env, str(tmp_path))
    try:
        link = await prog.link()
        before = lazily_freed(prog.pid)
        for _ in range(3):
            assert await link.park(5000) == PARKED
            await link.unpark(5.0)
            kept = lazily_freed(prog.pid) - before
            assert kept >= PARKED if keep == "1" else kept < PARKED
            assert await amoves(prog.count)
        link.close()
        assert prog.stop() == "intact (exit 0)", "a park into the reused memory parks this park's bytes"
    finally:
        prog.kill()


async def test_a_spill_gives_the_host_memory_back_and_the_unpark_reads_the_daemons_file(
    prog: Program, gpu_dir: FakeGpuDir, tmp_path: Path
) -> None:
    """The disk tier's lane for parked bytes (spill.py): the daemon writes them to its own unlinked file and hands
    it over; the host area goes, and the unpark reads the file straight into the bounce buffers. The file is closed
    then, so nothing of it is left."""
    directory = tmp_path / "spill"
    link = await prog.link()
    for _ in range(2):
        assert await link.park(5000) == PARKED and mapped(prog.pid, link.host_address)
        await spill_parked(link, directory)
        assert not mapped(prog.pid, link.host_address), "the host area is given back"
        assert not os.listdir(directory), "the file never had a name for long"
        assert files_open_in(prog.pid, directory), "the agent holds the file"
        assert not inherited_by_exec(prog.pid, directory), "close-on-exec: a program the model runs gets no copy"
        assert await astill(prog.count)
        await link.unpark(5.0)
        assert vram(gpu_dir, prog.pid) == PARKED + SMALL and await amoves(prog.count)
        wait_until("the file closed after the unpark", lambda: not files_open_in(prog.pid, directory))
    assert await link.park(5000) == PARKED, "a park after a spill parks into fresh host memory"
    await spill_parked(link, directory)
    link.close()  # the daemon goes away: the agent unparks by itself, from the file
    assert await amoves(prog.count)
    assert prog.stop() == "intact (exit 0)", "every byte came back from the file"


async def test_a_read_ahead_gives_the_unpark_the_spill_files_first_bytes_from_ram(
    prog: Program, tmp_path: Path
) -> None:
    """A thaw asks for the spill file's first bytes to be read ahead while the driver restores the contexts
    (read_ahead): the unpark takes them from RAM. The file's first bytes are overwritten once they were read, so
    the program's memory comes back intact only if the unpark did not read them from the file again (the next test
    shows that it would notice)."""
    directory = tmp_path / "spill"
    link = await prog.link()
    with pytest.raises(AgentFailed, match="'read_ahead' while not parked"):
        await link.read_ahead(MIB, 5.0)
    await link.park(5000)
    with pytest.raises(AgentFailed, match="nothing spilled to read ahead") as refused:
        await link.read_ahead(MIB, 5.0)
    assert refused.value.answered
    await spill_parked(link, directory)
    for bad in (-1, True, 1.5, 1 << 31, None):
        with pytest.raises(AgentFailed, match=r"bytes must be an integer in \[0, 1073741824\]"):
            await link._call({"op": "read_ahead", "bytes": bad}, 5.0)
    tasks, read = len(os.listdir(f"/proc/{prog.pid}/task")), chars_read(prog.pid)
    assert await link.read_ahead(8 * MIB + 100, 5.0) == 8 * MIB, "whole pages"
    assert await link.read_ahead(PARKED, 5.0) == 8 * MIB, "asked again: what the first call started"
    wait_until(
        "the read-ahead's threads done",
        lambda: chars_read(prog.pid) - read >= 8 * MIB and len(os.listdir(f"/proc/{prog.pid}/task")) == tasks,
    )
    # The first piece (one buffer, 4 or 8 MiB) lies within the read-ahead; one across its end is read from the file
    scribble_over_spill_file(prog.pid, directory, 4 * MIB)
    await link.unpark(5.0)
    wait_until("the file closed after the unpark", lambda: not files_open_in(prog.pid, directory))
    link.close()
    assert prog.stop() == "intact (exit 0)", "the first piece came from RAM, the rest from the file"


async def test_an_unpark_reads_the_file_where_the_read_ahead_has_not_got(prog: Program, tmp_path: Path) -> None:
    """What lies beyond the read-ahead still comes from the file (scribbled over: the program sees it)."""
    directory = tmp_path / "spill"
    link = await prog.link()
    await link.park(5000)
    await spill_parked(link, directory)
    assert await link.read_ahead(4 * MIB, 5.0) == 4 * MIB
    scribble_over_spill_file(prog.pid, directory, 8 * MIB)
    await link.unpark(5.0)
    link.close()
    assert prog.stop() != "intact (exit 0)"


def chars_read(pid: int) -> int:
    """Bytes process `pid` has read (rchar of /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


async def test_a_spill_the_agent_cannot_take_changes_nothing(prog: Program, tmp_path: Path) -> None:
    link = await prog.link()
    (tmp_path / "spill").mkdir()
    short = tmp_path / "spill" / "short"
    short.write_bytes(b"x" * 4096)
    fd = os.open(short, os.O_RDONLY)
    try:
        with pytest.raises(AgentFailed, match="'spill' while not parked"):
            await link.spill(fd, 5.0)
        await link.park(5000)
        with pytest.raises(AgentFailed, match=r"at least the \d+ parked bytes; nothing was given back") as failed:
            await link.spill(fd, 5.0)
        assert failed.value.answered and mapped(prog.pid, link.host_address)
        with pytest.raises(AgentFailed, match="spill needs the file"):
            await link._call({"op": "spill"}, 5.0)
    finally:
        os.close(fd)
    assert not files_open_in(prog.pid, tmp_path / "spill"), "a file not taken is closed"
    await link.unpark(5.0)
    link.close()
    assert prog.stop() == "intact (exit 0)"


async def test_work_that_does_not_finish_in_time_fails_the_park_and_nothing_else(
    prog: Program, gpu_dir: FakeGpuDir
) -> None:
    """The synchronize before the copy waits no longer than the daemon's timeout (work let in before the gate
    closed may wait on something a thread held at the gate would do): the park fails, the gate reopens."""
    link = await prog.link()
    gpu_dir.delay(prog.pid, "ctx-sync", 3000)
    with pytest.raises(AgentFailed, match="did not finish within 1000 ms; nothing was parked") as failed:
        await link.park(500)
    assert failed.value.answered
    gpu_dir.clear_delays()
    assert vram(gpu_dir, prog.pid) == PARKED + SMALL
    assert await amoves(prog.count), "the gate is open again"
    link.close()
    assert prog.stop() == "intact (exit 0)"


async def test_an_unpark_without_room_keeps_the_bytes_parked_until_there_is(prog: Program, gpu_dir: FakeGpuDir) -> None:
    link = await prog.link()
    await link.park(5000)
    gpu_dir.allocate("squatter", 1024 * MIB - SMALL - 4 * MIB, GPU0)  # room for one 4 MiB buffer, not all
    with pytest.raises(AgentFailed, match="stay parked") as failed:
        await link.unpark(5.0)
    assert failed.value.answered
    assert await astill(prog.count), "the gate stays closed while memory is missing"
    gpu_dir.free("squatter")
    await link.unpark(5.0)
    assert await amoves(prog.count)
    link.close()
    assert prog.stop() == "intact (exit 0)"


@pytest.mark.parametrize(
    "message",
    [
        b"nonsense\n",
        b"[1, 2]\n",
        b'{"op": "park"}\n',
        b'{"op": "park", "timeout_ms": 1.5}\n',
        b'{"op": "park", "timeout_ms": true}\n',
        b'{"op": "park", "timeout_ms": 99999999999999999999999}\n',
        b'{"op": "park", "timeout_ms": -1}\n',
        b'{"op": "unpark"}\n',
        b'{"op": ["park"], "timeout_ms": 10}\n',
        b'{"op": "park", "timeout_ms": 10, "x": {"y": [1, "\\u00e9\\"", null]}\n',  # unterminated object
        b"x" * 5000,
    ],
)
async def test_bad_requests_change_nothing(prog: Program, gpu_dir: FakeGpuDir, message: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(socket_path(prog.dir, prog.pid))
        s.sendall(message)
        with contextlib.suppress(OSError):
            reply = s.recv(4096)
            assert not reply or reply.startswith(b'{"ok":false,"error":')
    assert vram(gpu_dir, prog.pid) == PARKED + SMALL and await amoves(prog.count)
    link = await prog.link()  # the listener still serves
    assert await link.park(5000) == PARKED
    await link.unpark(5.0)
    link.close()
    assert prog.stop() == "intact (exit 0)"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_other_users_are_not_served(
    gpu_dir: FakeGpuDir, preload_lib: Path, preload_program: Path, fakecuda_lib: Path
) -> None:
    directory = tempfile.mkdtemp(prefix="gpusched-agent-test-", dir="/tmp")
    os.chmod(directory, 0o755)
    p = Program([str(preload_program), GPU0, "1"], program_env(preload_lib, fakecuda_lib, directory), directory)
    try:
        path = socket_path(directory, p.pid)
        os.chmod(path, 0o666)  # even where the file lets them in, the interposer checks who connected
        out = park_as_nobody(path)
        assert out.stdout.strip() == "refused", out.stderr
        assert vram(gpu_dir, p.pid) == 4 * MIB + 8 * MIB + SMALL, "nothing was parked"
        assert p.stop() == "intact (exit 0)"
    finally:
        p.kill()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_process_that_never_calls_cuinit_is_left_alone(preload_lib: Path, tmp_path: Path) -> None:
    """LD_PRELOAD reaches every child (compilers, shells): there the interposer loads nothing and starts nothing."""
    check = (
        "import os\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('libcuda' in maps, 'libgpuschedd-preload' in maps, len(os.listdir('/proc/self/task')))\n"
    )
    env = dict(os.environ, LD_PRELOAD=str(preload_lib), GPUSCHED_AGENT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "1"]
    assert not list(tmp_path.iterdir()), "no socket"


def test_without_an_agent_directory_the_program_runs_on_the_driver_alone(
    gpu_dir: FakeGpuDir, preload_lib: Path, preload_program: Path, fakecuda_lib: Path
) -> None:
    p = Program([str(preload_program), GPU0, "2"], program_env(preload_lib, fakecuda_lib, None), "")
    try:
        wait_until("launches", lambda: p.count() > 10)
        assert p.stop() == "intact (exit 0)"
    finally:
        p.kill()
