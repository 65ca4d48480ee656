"""Freeze/thaw benchmark on a real GPU: Qwen2.5-shaped models (random weights, saved locally, no downloads)
served by bench/serve.py, run and frozen through gpuschedd's engine (cgroupfs units, driver checkpoint).

    sudo PYTHONPATH=src python3 bench/bench.py [--sizes 0.5B,1.5B,7B] [--runs 3] [--thp always,madvise]
        [--paths driver,agent,agent-only]

Prints a table: GPU memory, what the agent parked, what stays on the GPU while frozen, freeze, thaw, thaw → first
token, cold start (process start → first token), the ratio of gpuschedd's freeze/thaw to the bare driver API on the
same process (goal ≤ 1.05), per THP mode; per path: `driver` (the driver's checkpoint moves everything), `agent`
(the fast path: serve.py enables gpuschedd.agent, which parks the model's memory, and the driver moves the rest),
`agent-only` (KeepContext: the agent parks, the driver is not called, the CUDA context stays on the GPU), and
`inject` / `inject-only`: the same two with serve.py unmodified (no gpuschedd import; Run option InjectAgent
preloads the interposer built by `make preload`, given by --preload). Every token after a thaw is checked to be
the token the model gave before its first freeze. Medians over --runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from gpuschedd import preload  # noqa: E402
from gpuschedd.checkpoint.driver import DriverCheckpoint  # noqa: E402
from gpuschedd.config import Config, host_ram_bytes  # noqa: E402
from gpuschedd.engine import Engine  # noqa: E402
from gpuschedd.hostmem import THP_PATH, thp_mode  # noqa: E402
from gpuschedd.nvml import load_telemetry  # noqa: E402
from gpuschedd.options import RunOptions  # noqa: E402
from gpuschedd.units.cgroupfs import CgroupfsUnits  # noqa: E402

# Qwen2.5 configurations (their published config.json values).
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip


def make_model(size: str, workdir: Path) -> Path:
    """Save a randomly initialised bf16 model of this shape once; later runs reuse it."""
    out = workdir / f"qwen2.5-{size}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, torch_dtype="bfloat16", **SHAPES[size])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def first_token(sock_path: str, expected: str) -> float:
    """Seconds for one request; the model must answer `expected`, the token it gave when it started."""
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(b"go\n")
        token = s.recv(64).decode().strip()
    elapsed = time.monotonic() - t0
    if token != expected:
        raise RuntimeError(f"token {token} after a thaw; the model gave {expected} before")
    return elapsed


async def wait_file(path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        await asyncio.sleep(0.01)
    return Path(path).read_text()


@dataclass
class Row:
    size: str
    path: str = "driver"
    vram: int = 0
    parked: int = 0
    held: int = 0  # GPU memory the model's processes still hold while frozen (KeepContext: their contexts)
    token: str = ""  # what the model answered when it started
    cold: list[float] = field(default_factory=list)
    freeze: dict[str, list[float]] = field(default_factory=dict)
    thaw: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, list[float]] = field(default_factory=dict)
    bare_freeze: list[float] = field(default_factory=list)
    bare_thaw: list[float] = field(default_factory=list)
    ratio_freeze: list[float] = field(default_factory=list)
    ratio_thaw: list[float] = field(default_factory=list)


def set_thp(mode: str) -> None:
    with open(THP_PATH, "w") as f:
        f.write(mode)


async def start(engine: Engine, name: str, model_dir: Path, sock: str, row: Row) -> float:
    for stale in (sock, sock + ".ready"):
        if os.path.exists(stale):
            os.unlink(stale)
    t0 = time.time()
    agent = row.path in ("agent", "agent-only")
    argv = [sys.executable, str(HERE / "serve.py"), str(model_dir), sock] + (["--agent"] if agent else [])
    # serve.py --agent imports gpuschedd.agent: from this checkout (a user pip-installs gpuschedd in the model's env).
    env = [f"PYTHONPATH={HERE.parent / 'src'}"] if agent else []
    # the interposer's knobs (GPUSCHED_PRELOAD_*, docs/fast-path.md) set for the bench reach the model
    env += [f"{k}={v}" for k, v in os.environ.items() if k.startswith("GPUSCHED_PRELOAD_")]
    options = RunOptions(
        agent=agent,
        inject_agent=row.path.startswith("inject"),
        keep_context=row.path.endswith("-only"),
        environment=env,
    )
    await engine.run(name, argv, options, 0)
    ready = (await wait_file(sock + ".ready", 600)).split()
    row.token = ready[2]
    return float(ready[1]) - t0


async def bench_size(engine: Engine, size: str, path: str, args: argparse.Namespace, workdir: Path) -> Row:
    row = Row(size, path)
    model_dir = make_model(size, workdir)
    name, sock = f"bench-{size.replace('.', '_')}-{path}", str(workdir / f"{size}.sock")
    for i in range(args.cold_runs):
        row.cold.append(await start(engine, name, model_dir, sock, row))
        if i < args.cold_runs - 1:
            await engine.stop(name)
    model = engine.get(name)
    await engine.refresh(model)
    row.vram = model.vram_bytes
    driver = engine.checkpoint
    for mode in args.thp:
        set_thp(mode)
        for _ in range(args.runs):
            t0 = time.monotonic()
            await engine.freeze(name)
            row.freeze.setdefault(mode, []).append(time.monotonic() - t0)
            row.held = sum(sum(v.values()) for pid, v in engine.telemetry.vram_by_pid().items() if pid in model.pids)
            t0 = time.monotonic()
            await engine.thaw(name)
            row.thaw.setdefault(mode, []).append(time.monotonic() - t0)
            row.first.setdefault(mode, []).append(row.thaw[mode][-1] + first_token(sock, row.token))
            row.parked = model.parked_bytes
            expected = path.replace("inject", "agent")  # the daemon cannot tell the interposer from the agent
            if model.freeze_path != expected:
                raise RuntimeError(f"{name}: the freeze took the {model.freeze_path} path, not the {expected} path")
    # gpuschedd against the bare driver API on the same process, alternating, in the last THP mode.
    pids = driver.cuda_pids(model.pids)
    for _ in range(args.runs if path == "driver" else 0):
        t0 = time.monotonic()
        for pid in pids:
            driver.lock(pid, 10_000)
        for pid in pids:
            driver.checkpoint(pid)
        row.bare_freeze.append(time.monotonic() - t0)
        t0 = time.monotonic()
        for pid in pids:
            driver.restore(pid)
        for pid in pids:
            driver.unlock(pid)
        row.bare_thaw.append(time.monotonic() - t0)
        t0 = time.monotonic()
        await engine.freeze(name)
        ours_freeze = time.monotonic() - t0
        t0 = time.monotonic()
        await engine.thaw(name)
        ours_thaw = time.monotonic() - t0
        row.ratio_freeze.append(ours_freeze / row.bare_freeze[-1])
        row.ratio_thaw.append(ours_thaw / row.bare_thaw[-1])
    first_token(sock, row.token)  # still serving, and right, after all of it
    await engine.stop(name)
    return row


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def print_table(rows: list[Row], modes: list[str], command: str) -> None:
    header = ["model", "path", "GPU mem", "parked", "held frozen"]
    for mode in modes:
        header += [f"freeze s ({mode})", f"thaw s ({mode})", f"thaw→1st token s ({mode})"]
    header += ["cold start s", "freeze/bare", "thaw/bare"]
    lines = [header]
    for r in rows:
        parked = f"{r.parked / 2**30:.1f} GiB" if r.parked else "-"
        line = [f"Qwen2.5-{r.size}", r.path, f"{r.vram / 2**30:.1f} GiB", parked, f"{r.held / 2**30:.2f} GiB"]
        for mode in modes:
            line += [med(r.freeze.get(mode, [])), med(r.thaw.get(mode, [])), med(r.first.get(mode, []))]
        line += [med(r.cold), med(r.ratio_freeze), med(r.ratio_thaw)]
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
    print(f"\nmedians over the runs; reproduce with: {command}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5B,1.5B,7B")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--thp", default="madvise,always")
    parser.add_argument("--paths", default="driver,agent")
    parser.add_argument("--workdir", default="/var/tmp/gpusched-bench")
    # the interposer for the inject paths: this checkout's `make preload`, not an installed one
    parser.add_argument("--preload", default=str(HERE.parent / "build/preload/libgpuschedd-preload.so"))
    parser.add_argument("--cgroup-root", default="/sys/fs/cgroup/gpusched-bench")
    args = parser.parse_args()
    args.thp = args.thp.split(",")
    preload.library_path = lambda: args.preload  # this checkout's build, as an installed daemon finds its own
    # The engine's log on stderr: how long each agent took to park and unpark.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    original_thp = thp_mode()
    config = Config(ram_budget_bytes=int(host_ram_bytes() * 0.8), cgroup_root=args.cgroup_root)
    units = CgroupfsUnits(args.cgroup_root)
    engine = Engine(units, DriverCheckpoint(), load_telemetry(), config)
    await units.setup()
    await engine.start()
    rows = []
    try:
        for size in args.sizes.split(","):
            for path in args.paths.split(","):
                rows.append(await bench_size(engine, size, path, args, workdir))
                print(f"done {size} {path}", file=sys.stderr, flush=True)
    finally:
        for name in list(engine.models):
            await engine.stop(name)
        if original_thp in ("always", "madvise", "never"):
            set_thp(original_thp)
    print_table(rows, args.thp, "PYTHONPATH=src python3 bench/bench.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    asyncio.run(main())
