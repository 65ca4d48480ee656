"""Hostile agents against everyone else's freezes, through the installed daemon on the fake GPU. Run it in the
system tests' sandbox (it installs the project there, as the system tests do):

    SYSD_NAME=gs-bench SYSD_NETNS=1 SYSD_BIND="$PWD" tools/sandbox.sh with .venv/bin/python bench/hostile_agents.py \
        [--counts 0,8,32] [--runs 5]

For each N: N models run with --agent whose own code serves the agent socket and never answers (half silent, half
drip-feeding a byte every 0.2 s; fake_model.py --hostile-agent), and a freeze of each is left waiting on its agent
(AgentTimeoutSec=600 s here). Meanwhile another model is frozen and thawed through its own agent --runs times: the
table shows its median freeze and thaw, which should not depend on N. Then each hostile model is stopped while its
freeze waits: the table shows the median time of that `gpusched stop` (it cuts the wait) and whether any of their
processes was left."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests" / "system")]

import fakegpu_sys as fg  # noqa: E402
import sysutil  # noqa: E402
from sysutil import gpusched, list_models, wait_until  # noqa: E402
from test_fastpath import run_agent_model  # noqa: E402


def timed(*args: str) -> float:
    t0 = time.monotonic()
    gpusched(*args)
    return time.monotonic() - t0


def hostile(fmodels: fg.FakeModels, i: int) -> fg.FakeModel:
    kind = ("silent", "drip")[i % 2]
    model = fg.FakeModel(f"{fmodels.prefix}-{kind}{i}", 1)
    fmodels.started.append(model)
    argv = [*fg.fake_model_argv(model.name, 16 * fg.MIB, 1), "--hostile-agent", kind]
    gpusched("run", "--name", model.name, "--agent", "--", *argv)
    return model


def cycles(name: str, runs: int) -> tuple[float, float]:
    """Median freeze and thaw of `name` over `runs` cycles."""
    freezes, thaws = [], []
    for _run in range(runs):
        freezes.append(timed("freeze", name))
        thaws.append(timed("thaw", name))
    return statistics.median(freezes), statistics.median(thaws)


def one(fmodels: fg.FakeModels, n: int, runs: int) -> tuple[float, float, float, float, float, int]:
    bad = [hostile(fmodels, i) for i in range(n)]
    root = Path("/run/gpusched-agent")
    for m in bad:
        wait_until("the hostile agent's socket", lambda m=m: list((root / m.name).glob("agent-*.sock")), 30)
    fast = run_agent_model(fmodels, f"fast{n}")
    # The same processes on the same CPUs, no freeze waiting on them: what the host's load alone costs.
    idle = cycles(fast.name, runs)
    waiting = [subprocess.Popen(["gpusched", "freeze", m.name], stderr=subprocess.PIPE, text=True) for m in bad]
    for m, p in zip(bad, waiting, strict=True):
        wait_until(
            f"{m.name} freezing",
            lambda m=m, p=p: list_models()[m.name]["state"] == "freezing" or p.poll() is not None,
            300,
        )
        assert p.poll() is None, f"{m.name}: {p.communicate()[1]} {list_models()[m.name]}"
    busy = cycles(fast.name, runs)
    assert all(p.poll() is None for p in waiting), "a hostile freeze ended before the measurements did"
    stops = [timed("stop", m.name) for m in bad]
    for p in waiting:
        p.wait(30)
    left = sum(1 for m in bad if fg.cgroup_pids_of(m.unit))
    gpusched("stop", fast.name)
    return *idle, *busy, statistics.median(stops) if stops else 0.0, left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,8,32")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sysutil.install_project()
    subprocess.run(["systemctl", "start", "gpuschedd.service"], check=True)
    sysutil.ensure_workdir()
    rows = []
    with fg.fake_gpu_daemon() as fake:
        fg.CONF.write_text(fg.CONF.read_text() + "AgentTimeoutSec=600\n")  # the hostile freezes wait all along
        fg.restart_daemon()
        for n in (int(c) for c in args.counts.split(",")):
            fmodels = fg.FakeModels(f"bench-n{n}", fake)
            try:
                rows.append((n, *one(fmodels, n, args.runs)))
            finally:
                fmodels.cleanup()
    print("| hostile models | other model's freeze / thaw, none waiting | while N freezes wait on their agents |"
          " Stop cutting a waiting freeze | processes left |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for n, freeze0, thaw0, freeze, thaw, stop, left in rows:
        cut = f"{stop:.3f} s" if n else "-"
        print(f"| {n} | {freeze0:.3f} s / {thaw0:.3f} s | {freeze:.3f} s / {thaw:.3f} s | {cut} | {left} |")
    print(f"\nmedians of {args.runs} runs; reproduce: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
