"""The transparent fast path on a real GPU: unmodified programs under LD_PRELOAD=libgpuschedd-preload.so, parked
and unparked through the daemon's own AgentLink (src/gpuschedd/agentlink.py) and, for "freeze releasing all GPU
memory", the driver's checkpoint of the rest (gpuschedd.checkpoint.driver), in the daemon's order: freeze = park,
lock, checkpoint; thaw = restore, unlock, unpark. The model's request is sent before the thaw starts; "thaw →
first token" is from the thaw's start to the answer. Checks after every thaw: tokens, a hash of every weight's
bits, a CUDA graph's replay and a torch.compile'd function's output are what they were before the first freeze;
GPU memory (nvidia-smi) while frozen.

Usage (root, on the GPU machine; PRELOAD=path of the built library):
    PYTHONPATH=src python3 bench/transparent/run.py torch SIZE [compile] [--cycles N]
    PYTHONPATH=src python3 bench/transparent/run.py cost SIZE [--rounds N]   (tokens/s and a launch-bound loop,
        with and without; a first round to warm up is not counted; medians and their ratio at the end)
    PYTHONPATH=src python3 bench/transparent/run.py cuda ./cuprog [async]"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from gpuschedd.agentlink import AgentLink
from gpuschedd.checkpoint.driver import DriverCheckpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def gpu_mem_mib(pid: int) -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return sum(int(used) for p, used in (line.split(", ") for line in out.splitlines() if line) if int(p) == pid)


class Program:
    def __init__(self, argv: list[str], extra_env: dict[str, str], preload: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="gpusched-agent-")
        env = dict(os.environ, GPUSCHED_AGENT_DIR=self.dir, **extra_env)
        if preload:
            env["LD_PRELOAD"] = os.environ["PRELOAD"]
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.ready = self.p.stdout.readline().strip()  # type: ignore[union-attr]

    def ask(self, cmd: str) -> str:
        self.send(cmd)
        return self.p.stdout.readline().strip()  # type: ignore[union-attr]

    def send(self, cmd: str) -> None:
        self.p.stdin.write(cmd + "\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]

    async def link(self) -> AgentLink:
        for _ in range(100):
            link = await AgentLink.connect(self.dir, self.p.pid, 10.0)
            if link:
                return link
            time.sleep(0.05)
        raise SystemExit("no agent socket")


async def freeze(prog: Program, link: AgentLink, drv: DriverCheckpoint | None) -> tuple[float, int, float]:
    t0 = time.monotonic()
    parked = await link.park(30_000)
    park_s = link.seconds
    if drv:
        drv.lock(prog.p.pid, 10_000)
        drv.checkpoint(prog.p.pid)
    return time.monotonic() - t0, parked, park_s


async def torch_run(size: str, compile_: bool, cycles: int, drv: DriverCheckpoint) -> None:
    argv = [sys.executable, os.path.join(HERE, "plain_model.py"), size] + (["compile"] if compile_ else [])
    extra = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
    prog = Program(argv, extra)
    print("ready:", prog.ready, flush=True)
    want_check, want_tok = prog.ask("check"), prog.ask("tok")
    held = gpu_mem_mib(prog.p.pid)
    link = await prog.link()
    rows = []
    for i in range(cycles):
        for path, backend in (("preload+driver", drv), ("preload, contexts kept", None)):
            f_s, parked, park_s = await freeze(prog, link, backend)
            frozen_mib = gpu_mem_mib(prog.p.pid)
            t0 = time.monotonic()
            prog.send("tok")  # waiting for the thaw, like a request that arrived while frozen
            if backend:
                backend.restore(prog.p.pid)
                backend.unlock(prog.p.pid)
            await link.unpark(60)
            unpark_s = link.seconds
            thaw_s = time.monotonic() - t0
            tok = prog.p.stdout.readline().strip()  # type: ignore[union-attr]
            first_s = time.monotonic() - t0
            ok = tok == want_tok and prog.ask("check") == want_check
            row = dict(size=size, path=path, cycle=i, held_mib=held, frozen_mib=frozen_mib, parked=parked,
                       park_s=park_s, unpark_s=unpark_s, freeze_s=f_s, thaw_s=thaw_s, first_token_s=first_s,
                       out_gbps=parked / park_s / 1e9, in_gbps=parked / unpark_s / 1e9, identical=ok)  # fmt: skip
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    link.close()
    prog.p.stdin.close()  # type: ignore[union-attr]
    prog.p.wait(60)


def cost_run(size: str, rounds: int) -> None:
    """The interposer's running cost: rounds alternate between a process without it and one with it."""
    argv = [sys.executable, os.path.join(HERE, "plain_model.py"), size]
    progs = {"without": Program(argv, {}, preload=False), "with": Program(argv, {})}
    rows: list[dict] = []
    for r in range(rounds + 1):
        for name, prog in progs.items():
            row = dict(size=size, interposer=name, round=r, tokens_per_s=float(prog.ask("bench 200")),
                       launch_us=float(prog.ask("launch 50000")))  # fmt: skip
            print(json.dumps(row), flush=True)
            rows += [row] if r else []  # round 0 warms both up
    for key in ("tokens_per_s", "launch_us"):
        m = {n: statistics.median(x[key] for x in rows if x["interposer"] == n) for n in progs}
        print(f"median {key}: without {m['without']:.2f}, with {m['with']:.2f}, "
              f"with/without {m['with'] / m['without']:.3f}", flush=True)  # fmt: skip
    for prog in progs.values():
        prog.p.stdin.close()  # type: ignore[union-attr]
        prog.p.wait(60)


async def cuda_run(binary: str, mode: str, drv: DriverCheckpoint) -> None:
    prog = Program([binary, mode], {})
    print("ready:", prog.ready, flush=True)
    link = await prog.link()
    for i in range(3):
        before = int(prog.ask("count"))
        f_s, parked, park_s = await freeze(prog, link, drv)
        frozen = gpu_mem_mib(prog.p.pid)
        t0 = time.monotonic()
        drv.restore(prog.p.pid)
        drv.unlock(prog.p.pid)
        await link.unpark(60)
        thaw_s = time.monotonic() - t0
        time.sleep(0.2)
        after = int(prog.ask("count"))
        print(json.dumps(dict(prog=f"cuprog {mode}", cycle=i, parked=parked, park_s=park_s, freeze_s=f_s,
                              thaw_s=thaw_s, frozen_mib=frozen, launches_before=before, launches_after=after)),
              flush=True)  # fmt: skip
    link.close()
    print("result:", prog.ask("stop"), flush=True)


def main() -> None:
    drv = DriverCheckpoint()
    if sys.argv[1] == "cost":
        cost_run(sys.argv[2], int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3)
    elif sys.argv[1] == "torch":
        cycles = int(sys.argv[sys.argv.index("--cycles") + 1]) if "--cycles" in sys.argv else 3
        asyncio.run(torch_run(sys.argv[2], "compile" in sys.argv[3:], cycles, drv))
    else:
        asyncio.run(cuda_run(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "malloc", drv))


if __name__ == "__main__":
    main()
