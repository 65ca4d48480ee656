"""The `cli` checkpoint backend (so named in the config and on the bus): the `cuda-checkpoint` binary, one run a step.

Flags as the tool documents them (r570+): `--action lock|checkpoint|restore|unlock --pid P [--timeout MS]`,
`--get-state --pid P` (prints running, locked, checkpointed or failed), and, on r580+, `--device-map
old=new,...` for a restore onto other GPUs. The tool prints its error on stderr (sometimes stdout); that text
becomes CheckpointError.reason verbatim.

Each run pays the tool's own cuInit, so this backend is slower per call than `driver`; it exists for hosts
where the driver library lacks the API but the tool works, or where an admin prefers the tool."""

from __future__ import annotations

import shlex
import subprocess

from ..libcuda import device_prefix
from . import CheckpointError, CudaState

_STATES = {s.value: s for s in CudaState}

# A lock must come back after its own timeout; the process gets this much longer before it is abandoned.
LOCK_GRACE_S = 30.0


class CliCheckpoint:
    """CheckpointBackend over a cuda-checkpoint-compatible command line. `command` is the binary, or an
    argv prefix (the driver helper, `python -m gpuschedd.checkpoint.helper`, speaks the same flags)."""

    def __init__(self, command: str | list[str] = "cuda-checkpoint", name: str = "cli") -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        self.name = name
        self.devices = device_prefix()

    def _run(self, pid: int, step: str, args: list[str], timeout: float | None = None) -> str:
        argv = [*self.argv, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise CheckpointError(pid, step, f"{self.argv[0]}: not found") from None
        except subprocess.TimeoutExpired:
            raise CheckpointError(pid, step, f"{self.argv[0]} did not return within {timeout:.0f}s") from None
        if done.returncode != 0:
            reason = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
            raise CheckpointError(pid, step, reason)
        return done.stdout

    def state(self, pid: int) -> CudaState:
        out = self._run(pid, "get-state", ["--get-state", "--pid", str(pid)]).strip()
        state = _STATES.get(out.splitlines()[-1].strip().lower() if out else "")
        if state is None:
            raise CheckpointError(pid, "get-state", f"unexpected output: {out!r}")
        return state

    def cuda_pids(self, pids: list[int]) -> list[int]:
        """The tool only says that --get-state failed; a failure means no CUDA context (as CRIU's plugin reads
        a failed --get-restore-tid), except when the tool itself cannot run."""
        found = []
        for pid in pids:
            try:
                self.state(pid)
            except CheckpointError as e:
                if e.reason.endswith(": not found") or "did not return" in e.reason:
                    raise
                continue
            found.append(pid)
        return found

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = ["--action", "lock", "--pid", str(pid)]
        if timeout_ms > 0:
            args += ["--timeout", str(int(timeout_ms))]
        self._run(pid, "lock", args, timeout=timeout_ms / 1000 + LOCK_GRACE_S if timeout_ms > 0 else None)

    def checkpoint(self, pid: int) -> None:
        self._run(pid, "checkpoint", ["--action", "checkpoint", "--pid", str(pid)])

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
        args = ["--action", "restore", "--pid", str(pid)]
        if gpu_pairs:
            args += ["--device-map", ",".join(f"{old}={new}" for old, new in gpu_pairs)]
        self._run(pid, "restore", args)

    def unlock(self, pid: int) -> None:
        self._run(pid, "unlock", ["--action", "unlock", "--pid", str(pid)])
