"""A model process for the swap benchmark (bench/swap/run.py), run as a unit by gpuschedd's engine: the bf16
weights of a Qwen2.5 shape (bench/transparent/plain_model.py's SHAPES, random and seeded, no download), and
nothing else on the GPU. With --agent it enables gpuschedd.agent and allocates them inside parkable(); under
InjectAgent it knows nothing of gpuschedd (the preloaded interposer parks its allocations).

It writes DIR/ready.<pid> ({"bits": ...}: a sum over every weight's bits) once loaded; on SIGUSR1 it sums them
again and writes DIR/verify.<pid> ({"ok": same as at start}).

    python3 model.py SIZE DIR [--agent]"""

import contextlib
import json
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "transparent"))
from plain_model import SHAPES


def write_json(path: str, data: dict[str, object]) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f)
    os.replace(f"{path}.tmp", path)


def main() -> None:
    size, out, agent_on = sys.argv[1], sys.argv[2], "--agent" in sys.argv[3:]
    busy = parkable = contextlib.nullcontext
    if agent_on:
        import gpuschedd.agent

        agent = gpuschedd.agent.enable()
        busy, parkable = agent.busy, agent.parkable
    hidden, inter, layers, kv, vocab = SHAPES[size]
    g = torch.Generator(device="cuda").manual_seed(os.getpid())
    shapes = [(vocab, hidden), (vocab, hidden)]
    shapes += [s for _ in range(layers) for s in ((hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                                                    (inter, hidden), (inter, hidden), (hidden, inter))]  # fmt: skip
    with parkable():
        weights = [torch.empty(*s, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for s in shapes]

    def bits() -> int:
        with busy():
            return sum(int(t.view(torch.int16).sum(dtype=torch.int64)) for t in weights)

    first, pid, asked = bits(), os.getpid(), []
    signal.signal(signal.SIGUSR1, lambda _s, _f: asked.append(True))
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    write_json(os.path.join(out, f"ready.{pid}"), {"bits": first, "bytes": nbytes})
    while True:
        time.sleep(0.05)
        if asked:
            asked.clear()
            write_json(os.path.join(out, f"verify.{pid}"), {"ok": bits() == first})


if __name__ == "__main__":
    main()
