"""Does calling the CUDA checkpoint API from the long-lived daemon cost VRAM or hold a context?

    sudo PYTHONPATH=src python3 bench/driver_context.py

Measures GPU memory used (NVML) and whether this process appears among the GPU's processes: before loading
libcuda, after cuInit(0), and after a full lock/checkpoint/restore/unlock cycle of a real PyTorch process
driven from here. Prints a table and the command to reproduce it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import pynvml

from gpuschedd.checkpoint.driver import DriverCheckpoint

TARGET = (
    "import torch, time, sys; x = torch.ones(256 << 20, device='cuda'); print('ready', flush=True); time.sleep(600)"
)


def snapshot() -> tuple[int, bool]:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h) + pynvml.nvmlDeviceGetGraphicsRunningProcesses(h)
    return used, any(p.pid == os.getpid() for p in procs)


def main() -> None:
    pynvml.nvmlInit()
    rows = [("baseline (NVML only)", *snapshot())]
    target = subprocess.Popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE, text=True)
    assert target.stdout is not None and target.stdout.readline().strip() == "ready"
    rows.append(("+ a PyTorch target (1 GiB)", *snapshot()))
    driver = DriverCheckpoint()
    rows.append(("+ libcuda loaded, cuInit(0) here", *snapshot()))
    driver.lock(target.pid, 10_000)
    driver.checkpoint(target.pid)
    time.sleep(0.2)
    rows.append(("target checkpointed from here", *snapshot()))
    driver.restore(target.pid)
    driver.unlock(target.pid)
    time.sleep(0.2)
    rows.append(("target restored and unlocked", *snapshot()))
    target.kill()
    target.wait()
    time.sleep(0.5)
    rows.append(("target gone; this process still has cuInit", *snapshot()))
    print("| step | GPU memory used (MiB) | this process listed by NVML |")
    print("|---|---|---|")
    for step, used, listed in rows:
        print(f"| {step} | {used / 2**20:.0f} | {'yes' if listed else 'no'} |")
    print("\nreproduce with: sudo PYTHONPATH=src python3 bench/driver_context.py")


if __name__ == "__main__":
    main()
