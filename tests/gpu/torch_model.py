"""A real PyTorch "model" for the GPU tests: holds a known amount of VRAM filled with random data,
and shows it is alive and intact.

    torch_model.py --mib 2048 --dir DIR [--children 1] [--matmul] [--agent] [--port P]

Every process (the main one and each child, each with its own CUDA context) writes DIR/status.<pid>
(JSON: pid, counter, ready) about ten times a second; the counter moves only while the process computes.
On SIGUSR1 it re-hashes its tensors on the GPU and writes DIR/verify.<pid> (JSON: ok, digest), so a test can
prove every byte came back bit-identical after a thaw. --matmul keeps the GPU busy between status writes
(a freeze then lands mid-compute). The tensors are allocated by two worker threads, as transformers' loader
does. --agent enables gpuschedd.agent (the fast path), allocates the tensors inside agent.parkable(), does each
step inside agent.busy(), and also captures a CUDA graph (outside it) before the first freeze: verify then also
replays it and compares its output with the one computed at start. --port P answers each TCP connection to
127.0.0.1:P with "PID SUM\\n", SUM computed on the GPU from its first tensor."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def write_json(path: str, data: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def serve(port: int, tensor: torch.Tensor, busy: Any) -> None:
    """--port: answer each TCP connection on 127.0.0.1 with a line computed on the GPU from the tensors."""
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        with conn, busy():
            conn.sendall(f"{os.getpid()} {int(tensor[: 1 << 20].sum())}\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--children", type=int, default=0)
    parser.add_argument("--matmul", action="store_true")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--agent", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    faulthandler.register(signal.SIGQUIT, all_threads=True)  # a stuck test can ask every thread where it is
    busy = parkable = contextlib.nullcontext
    if args.agent:
        import gpuschedd.agent

        agent = gpuschedd.agent.enable()
        busy, parkable = agent.busy, agent.parkable

    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--mib", str(args.mib), "--dir", args.dir, "--seed", str(args.seed + 1 + i)]
            + (["--matmul"] if args.matmul else [])
        )
        for i in range(args.children)
    ]

    torch.manual_seed(args.seed)  # the bytes differ from run to run (threads); each run compares with itself
    chunk = 256 << 20
    remaining = args.mib << 20
    sizes = []
    while remaining > 0:
        sizes.append(min(chunk, remaining))
        remaining -= sizes[-1]
    with parkable(), ThreadPoolExecutor(2) as loaders:  # worker threads allocate, as transformers' loader does
        tensors = list(loaders.map(lambda n: torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda"), sizes))
    a = torch.randn(2048, 2048, device="cuda")
    graph, graph_out, graph_ref = None, None, None
    if args.agent:
        w, x = torch.randn(1024, 1024, device="cuda"), torch.randn(64, 1024, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.tanh(x @ w)  # warm-up, as graph capture needs
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = torch.tanh(x @ w)
        graph.replay()
        graph_ref = graph_out.clone()
    original = digest(tensors)
    pid = os.getpid()
    requested = []

    def on_usr1(_signum: int, _frame: object) -> None:
        requested.append(True)

    signal.signal(signal.SIGUSR1, on_usr1)
    if args.port:
        threading.Thread(target=serve, args=(args.port, tensors[0], busy), daemon=True).start()
    counter = 0
    while True:
        with busy():
            if requested:
                requested.clear()
                now = digest(tensors)
                ok = now == original
                if graph is not None:
                    graph_out.zero_()
                    graph.replay()
                    ok = ok and torch.equal(graph_out, graph_ref)
                write_json(os.path.join(args.dir, f"verify.{pid}"), {"ok": ok, "digest": now})
            if args.matmul:
                for _ in range(20):
                    a = torch.tanh(a @ a)
            # Wait for the GPU through a device-to-host copy, as inference servers do (.item()). Measured on the
            # H100: a thread inside torch.cuda.synchronize() when the driver lock is taken gets an error and PyTorch
            # raises, so a test model must not sit in it (docs/gpu-results.md).
            float(a[0, 0].item())
        counter += 1
        write_json(os.path.join(args.dir, f"status.{pid}"), {"pid": pid, "counter": counter, "ready": True})
        time.sleep(0.05)
        if children and any(c.poll() is not None for c in children):
            sys.exit("a child process died")


if __name__ == "__main__":
    main()
