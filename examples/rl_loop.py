#!/usr/bin/python3
"""The README's RL loop: a policy model and a reward model take turns on one GPU. Each step rolls out with the
policy, swaps the reward model in to score the rollouts, and swaps the policy back. A swap moves the GPU memory to
host RAM and back in about a second, where loading a model again would take tens of seconds.

    rl_loop.py [--steps N] [--prefix P] [--work SECONDS] -- POLICY_COMMAND... -- REWARD_COMMAND...

Here rolling out and scoring only wait `--work` seconds while the model that is on the GPU runs; a real loop would
send its requests to the model's server. It prints one line per step, and stops both models at the end.
The SDK is the `gpuschedd` Python package: installed by `make install` under /usr/lib/gpuschedd/python, so run
it as `PYTHONPATH=/usr/lib/gpuschedd/python examples/rl_loop.py ...`, or `pip install` the project.
"""

from __future__ import annotations

import argparse
import sys
import time

from gpuschedd.client import GpuSched


def rl_loop(gs: GpuSched, policy: str, reward: str, steps: int, work: float) -> None:
    gs.freeze(reward)  # the reward model waits in host RAM until the first scoring
    for step in range(steps):
        time.sleep(work)  # roll out with the policy
        t0 = time.monotonic()
        gs.swap(policy, reward)  # score with the reward model
        t1 = time.monotonic()
        time.sleep(work)
        gs.swap(reward, policy)
        t2 = time.monotonic()
        print(f"step {step}: reward in after {t1 - t0:.3f} s, policy back after {t2 - t1:.3f} s", flush=True)


def main(argv: list[str]) -> int:
    if argv.count("--") != 2:
        print(__doc__.strip().splitlines()[4].strip(), file=sys.stderr)
        return 2
    first = argv.index("--")
    second = argv.index("--", first + 1)
    parser = argparse.ArgumentParser(prog="rl_loop.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prefix", default="rl")
    parser.add_argument("--work", type=float, default=0.2)
    args = parser.parse_args(argv[:first])
    policy, reward = f"{args.prefix}-policy", f"{args.prefix}-reward"
    with GpuSched() as gs:
        gs.run(policy, argv[first + 1 : second])
        gs.run(reward, argv[second + 1 :])
        try:
            rl_loop(gs, policy, reward, args.steps, args.work)
        finally:
            gs.stop(policy)
            gs.stop(reward)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
