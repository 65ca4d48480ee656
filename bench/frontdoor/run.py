"""The front door's GPU bench (bench/frontdoor/gpu.sh runs it inside tools/gpu-sandbox.sh's guest, as root, with
gpuschedd installed and running): two transformers models (bench/frontdoor/serve_openai.py, bench/bench.py's
random-weight shapes) per checkpoint path as catalog models behind gpusched-frontdoor with MaxRunning=1, driven by
the official openai client, streaming; the time from sending a request to its first token:

  cold   the model is stopped: the front door starts it (what llama-swap does on every switch)
  warm   the model runs
  thaw   the model is frozen, nothing else runs: the front door thaws it. Goal: first token <= its thaw (the
         front door's Thaw call, from its /metrics) + 50 ms. "of which the front door": that difference less a
         warm model's first token (the model's own compute and the client), i.e. what routing and proxying add
  swap   the other model runs (MaxRunning=1): the front door swaps them

    run.py OUTDIR [--size 0.5B] [--cycles 5] [--paths driver,agent]

Prints a markdown table (also OUTDIR/table.md) and one JSON line per request (OUTDIR/requests.jsonl)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from bench import make_model  # noqa: E402  (bench/bench.py: the same random-weight shapes, no downloads)

URL = "http://127.0.0.1:8080"
MODELS_D = Path("/etc/gpusched/models.d")
TORCH_PY = os.environ.get("TORCH_PY", sys.executable)
GOAL_S = 0.050


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def reload_catalog() -> None:
    sh("busctl", "call", "org.gpusched1", "/org/gpusched1", "org.gpusched1.Manager", "Reload")


def catalog_file(name: str, model_dir: Path, port: int, agent: bool) -> str:
    command = f"{TORCH_PY} {HERE / 'serve_openai.py'} {model_dir} --name {name} --port {port}"
    lines = ["[Model]", f"Command={command}{' --agent' if agent else ''}", "User=root",
             f"Environment=PYTHONPATH={REPO / 'src'}", f"BackendPort={port}"]  # fmt: skip
    if agent:
        lines.append("Agent=yes")
    return "\n".join(lines) + "\n"


def metric(name: str, label: str) -> float:
    with urllib.request.urlopen(f"{URL}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'{name}{{action="{label}"}} '):
                return float(line.split()[-1])
    return 0.0


def first_token(client: openai.OpenAI, model: str) -> tuple[float, str]:
    """Seconds from sending the request to the first token's event, and the whole answer."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
    )
    ttft, text = 0.0, ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - started
            text += chunk.choices[0].delta.content
    return ttft, text


def measured(client: openai.OpenAI, model: str, kind: str, action: str | None, log: list[dict]) -> dict:
    before = metric("gpusched_frontdoor_swap_seconds_sum", action) if action else 0.0
    ttft, text = first_token(client, model)
    call = metric("gpusched_frontdoor_swap_seconds_sum", action) - before if action else 0.0
    row = {"model": model, "kind": kind, "ttft_s": round(ttft, 4), "call_s": round(call, 4),
           "right_model": text.startswith(f"{model}:")}  # fmt: skip
    print(json.dumps(row), flush=True)
    log.append(row)
    return row


def bench_path(path: str, model_dir: Path, cycles: int, log: list[dict]) -> dict[str, list[dict]]:
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="none", max_retries=0, timeout=600)
    a, b = f"fd-{path}-a", f"fd-{path}-b"
    rows: dict[str, list[dict]] = {"cold": [], "warm": [], "thaw": [], "swap": []}
    rows["cold"].append(measured(client, a, "cold", "start", log))
    rows["cold"].append(measured(client, b, "cold", "start", log))  # a is frozen for it (MaxRunning=1)
    for _ in range(3):
        rows["warm"].append(measured(client, b, "warm", None, log))
    for _ in range(cycles):  # b runs, a is frozen
        rows["swap"].append(measured(client, a, "swap", "swap", log))
        sh("gpusched", "freeze", a)  # nothing runs now: the request for b is a plain thaw
        rows["thaw"].append(measured(client, b, "thaw", "thaw", log))
    for name in (a, b):
        subprocess.run(["gpusched", "stop", name], capture_output=True)
    return rows


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows) if rows else 0.0


def table(results: dict[str, dict[str, list[dict]]], size: str, command: str) -> str:
    out = [f"Front door, {size} models, MaxRunning=1, request -> first token through the openai client (medians, s)",
           "", "| path | cold start | warm | thaw call | thaw: first token | first token - thaw | goal <= 50 ms "
           "| of which the front door | swap call | swap: first token | answers by the right model |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path, rows in results.items():
        thaw_over = median(rows["thaw"], "ttft_s") - median(rows["thaw"], "call_s")
        over = f"{thaw_over * 1000:.0f} ms"
        own = f"{(thaw_over - median(rows['warm'], 'ttft_s')) * 1000:.0f} ms"
        right = all(r["right_model"] for kind in rows.values() for r in kind)
        out.append(
            f"| {path} | {median(rows['cold'], 'ttft_s'):.2f} | {median(rows['warm'], 'ttft_s'):.3f} "
            f"| {median(rows['thaw'], 'call_s'):.3f} | {median(rows['thaw'], 'ttft_s'):.3f} | {over} "
            f"| {'met' if thaw_over <= GOAL_S else 'MISSED'} | {own} | {median(rows['swap'], 'call_s'):.3f} "
            f"| {median(rows['swap'], 'ttft_s'):.3f} | {'yes' if right else 'NO'} |"
        )
    out += ["", f"Reproduce: {command}"]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--paths", default="driver,agent")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.size, Path("/var/tmp/gpusched-frontdoor-bench"))
    paths = args.paths.split(",")
    MODELS_D.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        for j, suffix in enumerate("ab"):
            port = 18300 + 10 * i + j
            (MODELS_D / f"fd-{path}-{suffix}.conf").write_text(catalog_file(f"fd-{path}-{suffix}", model_dir, port,
                                                                            path == "agent"))  # fmt: skip
    reload_catalog()
    Path("/etc/gpusched/frontdoor.conf").write_text("[FrontDoor]\nMaxRunning=1\nRequestTimeoutSec=300\n")
    sh("systemctl", "restart", "gpusched-frontdoor.socket")
    sh("systemctl", "restart", "gpusched-frontdoor.service")
    log: list[dict] = []
    results = {}
    failed = False
    for path in paths:
        try:
            results[path] = bench_path(path, model_dir, args.cycles, log)
        except Exception as e:  # one path failing still leaves the other's figures
            print(f"FAILED {path}: {e!r}", flush=True)
            failed = True
    (args.outdir / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    command = f"bench/frontdoor/gpu.sh OUTDIR  (run.py --size {args.size} --cycles {args.cycles} --paths {args.paths})"
    text = table(results, args.size, command)
    (args.outdir / "table.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
