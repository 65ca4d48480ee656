"""The PyTorch programs of the interposition probe (run.sh runs each under every interception point).

basic N     matmul (cuBLAS) + elementwise ops, N iterations, tensors of several sizes (the caching allocator)
compile N   a torch.compile'd function (Triton kernels, launched by Triton's launcher), N calls
graph N     a CUDA graph of a few ops captured once, replayed N times
bench N     launch-bound: N tiny in-place adds, timed (us per op)
pyagent     the injected-Python-agent alternative: route all of PyTorch's allocations into gpuschedd's
            ParkingLot from the start (what an injected .pth would do), then see what it holds and park/unpark"""

import sys
import time

import torch


def basic(n: int) -> None:
    x = torch.randn(1024, 1024, device="cuda")
    for i in range(n):
        y = x @ x
        z = torch.relu(y) + 1.0
        w = torch.empty(1 << (16 + i % 8), device="cuda")  # sizes 256 KiB .. 32 MiB
        w.fill_(float(i))
        del y, z, w
    torch.cuda.synchronize()
    print(f"basic: {n} iterations; reserved {torch.cuda.memory_reserved() >> 20} MiB")


def compiled(n: int) -> None:
    @torch.compile
    def f(a, b):
        return (a.sin() * b + a.cos()).relu() * 2

    a = torch.randn(1 << 20, device="cuda")
    b = torch.randn(1 << 20, device="cuda")
    f(a, b)
    torch.cuda.synchronize()
    print("compile: warm", flush=True)
    for _ in range(n):
        c = f(a, b)
    torch.cuda.synchronize()
    print(f"compile: {n} calls, sum {float(c.sum()):.3f}")


def graph(n: int) -> None:
    x = torch.ones(1 << 20, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.mul_(1.0).add_(1.0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.mul_(1.0).add_(1.0)
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    print(f"graph: {n} replays, x[0]={float(x[0])} (want {1 + 3 + n}: the capture itself runs nothing)")


def bench(n: int) -> None:
    x = torch.zeros(16, device="cuda")
    for _ in range(2000):
        x.add_(1.0)
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1.0)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    print(f"bench torch add_ n={n} us_per_op={best / n * 1e6:.3f}")


def pyagent() -> None:
    from gpuschedd.agent.cuda import Cuda
    from gpuschedd.agent.parking import ParkingLot
    from gpuschedd.agent.torch_pool import TorchPool

    free0, total = torch.cuda.mem_get_info()  # creates the context: what a hook at import time would see first
    lot = ParkingLot(Cuda())
    pool = TorchPool(lot)
    routing = pool.routing()
    routing.__enter__()  # never left: the injected agent routes everything
    free1, _ = torch.cuda.mem_get_info()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, dtype=torch.bfloat16) for _ in range(16)]).cuda()
    inp = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(inp).float().sum().item()
    torch.cuda.synchronize()
    free2, _ = torch.cuda.mem_get_info()
    used = free0 - free2
    print(
        f"pyagent: context+init {(total - free0) >> 20} MiB before the hook; after the hook's own setup "
        f"{(free0 - free1) >> 20} MiB; process now uses {used >> 20} MiB beyond the context; "
        f"pool (parkable) {lot.managed_bytes() >> 20} MiB; torch reserved {torch.cuda.memory_reserved() >> 20} MiB"
    )
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            inp.mul_(1.0)
        print("pyagent: graph capture while routing: ok")
    except Exception as e:  # what fails is the finding
        print(f"pyagent: graph capture while routing fails: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.synchronize()
    for _ in range(3):
        pool.release_cache()
        t0 = time.perf_counter()
        r = lot.park()
        t1 = time.perf_counter()
        freep, _ = torch.cuda.mem_get_info()
        lot.unpark()
        t2 = time.perf_counter()
        with torch.no_grad():
            out = model(inp).float().sum().item()
        print(
            f"pyagent: park {t1 - t0:.3f} s ({r.parked_bytes >> 20} MiB), still held on GPU while parked "
            f"{(total - freep) >> 20} MiB, unpark {t2 - t1:.3f} s, output identical: {out == ref}"
        )


if __name__ == "__main__":
    mode = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    {"basic": basic, "compile": compiled, "graph": graph, "bench": bench}.get(mode, lambda _: pyagent())(n)
