"""An unmodified PyTorch program for the transparent fast path's GPU proof (bench/transparent/run.py): it imports
nothing of gpuschedd. It builds a Qwen2.5-shaped stack of bf16 weights (random, seeded), captures a CUDA graph,
optionally compiles a function with torch.compile (Triton), and then answers requests on stdin:

    tok      -> greedy tokens of a small decoder pass over the weights
    check    -> a hash of every weight's bits, the graph's replay output and the compiled function's output
    bench N  -> tokens per second over N tokens
    launch N -> microseconds per x.add_(1) on 16 floats over N calls (launch-bound)

Usage: python3 plain_model.py SIZE [compile]   (SIZE: 7B, 1.5B, 0.5B or tiny)."""

import sys
import time

import torch

SHAPES = {  # hidden, intermediate, layers, kv width, vocabulary
    "7B": (3584, 18944, 28, 512, 152064),
    "1.5B": (1536, 8960, 28, 256, 151936),
    "0.5B": (896, 4864, 24, 128, 151936),
    "tiny": (512, 1024, 4, 128, 4096),
}


def main() -> None:
    size = sys.argv[1]
    compiled = len(sys.argv) > 2 and sys.argv[2] == "compile"
    hidden, inter, layers, kv, vocab = SHAPES[size]
    g = torch.Generator(device="cuda").manual_seed(1)

    def w(*shape: int) -> torch.Tensor:  # in place: no temporaries left in PyTorch's cache to park
        return torch.empty(*shape, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02, generator=g)

    embed = w(vocab, hidden)
    stack = [
        dict(q=w(hidden, hidden), k=w(kv, hidden), v=w(kv, hidden), o=w(hidden, hidden),
             gate=w(inter, hidden), up=w(inter, hidden), down=w(hidden, inter))
        for _ in range(layers)
    ]  # fmt: skip
    head = w(vocab, hidden)
    weights = [embed, head] + [t for layer in stack for t in layer.values()]

    def forward(token: int) -> int:
        x = embed[token].unsqueeze(0)
        for layer in stack:
            a = x @ layer["q"].T
            x = x + (a * torch.sigmoid(a)) @ layer["o"].T
            h = torch.nn.functional.silu(x @ layer["gate"].T) * (x @ layer["up"].T)
            x = x + h @ layer["down"].T
            x = x / x.float().norm().to(x.dtype) * 30
        return int((x @ head.T).argmax())

    def tokens() -> list[int]:
        out, t = [], 11
        for _ in range(4):
            t = forward(t)
            out.append(t)
        return out

    first = tokens()  # also initializes cuBLAS, which a graph capture cannot do
    static_in = torch.ones(1, hidden, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.nn.functional.silu(static_in @ stack[0]["gate"].T) @ stack[0]["down"].T
    fn = torch.compile(lambda t: torch.sin(t) * 2 + t.cos()) if compiled else None
    probe = torch.linspace(-3, 3, 4096, device="cuda")

    def check() -> str:
        bits = sum(int(t.view(torch.int16).sum(dtype=torch.int64)) for t in weights)
        graph.replay()
        torch.cuda.synchronize()
        replay = int(static_out.float().view(torch.int32).sum(dtype=torch.int64))
        comp = int(fn(probe).view(torch.int32).sum(dtype=torch.int64)) if fn else 0
        return f"{bits} {replay} {comp}"

    gib = sum(t.numel() * t.element_size() for t in weights) / 2**30
    print(f"ready {gib:.2f} GiB {check()} {first}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "tok":
            print(tokens(), flush=True)
        elif cmd == "check":
            print(check(), flush=True)
        elif cmd.startswith("bench "):
            n = int(cmd.split()[1]) // 4
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                tokens()
            print(f"{4 * n / (time.perf_counter() - t0):.1f}", flush=True)
        elif cmd.startswith("launch "):
            n, x = int(cmd.split()[1]), torch.zeros(16, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                x.add_(1)
            torch.cuda.synchronize()
            print(f"{(time.perf_counter() - t0) / n * 1e6:.2f}", flush=True)


if __name__ == "__main__":
    main()
