#!/usr/bin/env python3
"""A stand-in for a CUDA model process, for the fake libcuda (fakecuda.c). Standard library only, so it
runs as a unit's command anywhere (the systemd sandbox included).

It opens the fake driver's device file (FAKECUDA_DIR/dev/nvidiactl, held open for its whole life, as a real CUDA
process holds /dev/nvidia*), registers itself as a CUDA process (FAKECUDA_DIR/ctx/<pid>), counts in a file while its
CUDA state is RUNNING (a locked or checkpointed process blocks in its next CUDA call, as a real one does), and runs an
agent thread that answers the fake driver's checkpoint/restore requests the way the real driver's
in-process thread does: a checkpoint moves the "VRAM" into this process's RSS (a private anonymous mapping, as the
real driver's snapshot is, each page marked in its first byte), a restore reads every mark back and gives it up. A
page that came back different (from swap, after a page-out: docs/disk-tier.md) leaves FAKECUDA_DIR/corrupt/PID.
A process frozen by the cgroup freezer cannot answer.

With --hostile-agent drip|silent|garbage it serves the agent's socket itself and answers every request
the way a hostile model's code could: one byte of a reply every 0.2 s, never, or bytes that are no message.

With --park-bytes N it also runs gpuschedd's own agent (gpuschedd.agent, the fast path; then gpuschedd must
be importable) over N bytes of parkable fake device memory: every unit of work reads all of it inside
agent.busy(), so work that touched parked memory would crash the process (its pages are inaccessible), and
memory that came back different stops the counter with "CORRUPT" in the counter file.

    fake_model.py --dir D --vram BYTES --gpu UUID --counter FILE [--procs N] [--noncuda-child] [--no-agent]
                  [--park-bytes N] [--hostile-agent drip|silent|garbage]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import signal
import sys
import threading
import time

PAGE = 4096


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def page_marks(size: int) -> bytes:
    """The first byte of every page of a snapshot: never 0 (a page lost on the way comes back as zeros)."""
    return bytes(i % 255 + 1 for i in range(-(-size // PAGE)))


class FakeCudaProcess:
    def __init__(self, fdir: str, vram: int, gpu: str, agent: bool) -> None:
        self.dir, self.vram, self.agent = fdir, vram, agent
        self.pid = os.getpid()
        self.host_copy: mmap.mmap | None = None
        self.marks = b""  # what the first byte of each page of host_copy must be
        for sub in ("ctx", "state", "req", "ack", "dev"):
            os.makedirs(os.path.join(fdir, sub), exist_ok=True)
        # What cuInit does first: the driver's device file, open until the process ends.
        self.device = os.open(os.path.join(fdir, "dev", "nvidiactl"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        write_atomic(self.path("ctx"), f"vram={vram}\ngpu={gpu}\nagent={int(agent)}\n")

    def path(self, sub: str) -> str:
        return os.path.join(self.dir, sub, str(self.pid))

    def state(self) -> int:
        text = read(self.path("state"))
        return int(text) if text else 0

    def cuda_call(self) -> None:
        """Any CUDA call blocks while the process is locked or checkpointed."""
        while self.state() != 0:
            time.sleep(0.005)

    def serve(self) -> None:
        """The in-process thread that does the driver's copies."""
        done = ""
        restored: mmap.mmap | None = None
        while True:
            token = read(self.path("req"))
            if token and token != done:
                if token.startswith("checkpoint"):
                    buf = mmap.mmap(-1, max(self.vram, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                    self.marks = page_marks(len(buf))
                    buf[::PAGE] = self.marks  # touches every page
                    self.host_copy = buf
                elif token.startswith("restore") and self.host_copy is not None:
                    restored, self.host_copy = self.host_copy, None
                write_atomic(self.path("ack"), token)
                done = token
                if restored is not None:
                    # Checked after the answer, one byte a page: a restore takes no longer than it did without
                    # the check (tests time their kills by the fake driver's steps).
                    if restored[::PAGE] != self.marks:
                        os.makedirs(os.path.join(self.dir, "corrupt"), exist_ok=True)
                        write_atomic(self.path("corrupt"), token)
                    restored.close()
                    restored = None
            time.sleep(0.002)

    def unregister(self) -> None:
        for sub in ("ctx", "state", "req", "ack"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(sub))


class ParkableMemory:
    """N bytes of the agent's parkable memory in 6 MiB segments, each filled with its own byte."""

    SEGMENT = 6 << 20

    def __init__(self, nbytes: int) -> None:
        import ctypes

        from gpuschedd.agent.cuda import Cuda
        from gpuschedd.agent.parking import ParkingLot
        from gpuschedd.agent.protocol import AGENT_DIR_ENV, daemon_uid
        from gpuschedd.agent.server import Agent

        self.ctypes = ctypes
        self.lot = ParkingLot(Cuda(), threads=4, chunk=4 << 20)
        self.segments = [(self.lot.malloc(self.SEGMENT, 0), i % 251 + 1) for i in range(-(-nbytes // self.SEGMENT))]
        for address, byte in self.segments:
            ctypes.memset(address, byte, self.SEGMENT)
        self.agent = Agent(self.lot, os.environ.get(AGENT_DIR_ENV), daemon_uid())
        self.agent.start()

    def intact(self) -> bool:
        """Reads every byte (crashes if any page is not mapped: parked memory must never be touched)."""
        string_at = self.ctypes.string_at
        return all(string_at(a, self.SEGMENT) == bytes([b]) * self.SEGMENT for a, b in self.segments)


def hostile_agent(kind: str) -> None:
    """Serve $GPUSCHED_AGENT_DIR/agent-PID.sock (as the real agent would) and never answer a request well."""
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(os.environ["GPUSCHED_AGENT_DIR"], f"agent-{os.getpid()}.sock"))
    server.listen(16)

    def answer(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(4096)
            if kind == "garbage":
                conn.sendall(b"\x00\xff not a message\n")
            while kind == "drip":
                conn.sendall(b"{")
                time.sleep(0.2)
            time.sleep(3600)
        conn.close()

    while True:
        conn, _addr = server.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def work(proc: FakeCudaProcess | None, counter: str, memory: ParkableMemory | None = None) -> None:
    n = 0
    while True:
        if proc is not None:
            proc.cuda_call()
        if memory is not None:
            with memory.agent.busy():
                if not memory.intact():
                    write_atomic(counter, "CORRUPT")
                    return
        n += 1
        write_atomic(counter, str(n))
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=os.environ.get("FAKECUDA_DIR", "/tmp/fakecuda"))
    parser.add_argument("--vram", type=int, default=64 << 20)
    parser.add_argument("--gpu", default="GPU-00000000-0000-0000-0000-000000000000")
    parser.add_argument("--counter", required=True)
    parser.add_argument("--procs", type=int, default=1, help="CUDA processes: this one plus N-1 children")
    parser.add_argument("--noncuda-child", action="store_true", help="also run a child that never uses CUDA")
    parser.add_argument("--no-agent", action="store_true", help="copies need no thread in the target")
    parser.add_argument("--park-bytes", type=int, default=0, help="run gpuschedd.agent over this much memory")
    parser.add_argument("--hostile-agent", choices=("drip", "silent", "garbage"), help="serve a hostile agent")
    args = parser.parse_args()

    counter = args.counter
    cuda = True
    # Fork before any thread exists; each process then registers itself.
    for i in range(1, args.procs):
        if os.fork() == 0:
            counter = f"{args.counter}.{i}"
            break
    else:
        if args.noncuda_child and os.fork() == 0:
            counter, cuda = f"{args.counter}.noncuda", False

    proc = FakeCudaProcess(args.dir, args.vram, args.gpu, not args.no_agent) if cuda else None

    def stop(signum: int, frame: object) -> None:
        if proc is not None:
            proc.unregister()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if proc is not None and proc.agent:
        threading.Thread(target=proc.serve, daemon=True).start()
    memory = ParkableMemory(args.park_bytes) if proc is not None and args.park_bytes else None
    if args.hostile_agent:
        threading.Thread(target=hostile_agent, args=(args.hostile_agent,), daemon=True).start()
    work(proc, counter, memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
