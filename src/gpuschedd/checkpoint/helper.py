"""`python -m gpuschedd.checkpoint.helper`: the driver backend in a short-lived process, with the
command line of NVIDIA's cuda-checkpoint (--action lock|checkpoint|restore|unlock --pid P [--timeout MS]
[--device-map old=new,...], --get-state --pid P, --get-restore-tid --pid P).

Why: if calling libcuda from the long-lived daemon turned out to hold VRAM or a context, the daemon runs
each step through this helper instead (`helper_backend()`), and nothing CUDA lives in the daemon. It also
serves as a cuda-checkpoint stand-in over the fake libcuda in CI. Errors go to stderr as the driver's error
name (CUDA_ERROR_...), exit status 1; a driver without the API is exit status 2."""

from __future__ import annotations

import argparse
import sys

from . import CheckpointError
from .cuda_checkpoint import CliCheckpoint
from .driver import DriverCheckpoint, DriverUnavailable


def helper_backend() -> CliCheckpoint:
    """The driver backend, out of process: same name and semantics, one helper run per step."""
    return CliCheckpoint([sys.executable, "-m", "gpuschedd.checkpoint.helper"], name="driver")


def _device_map(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise argparse.ArgumentTypeError(f"bad --device-map entry {item!r}: expected oldUuid=newUuid")
        pairs.append((old.strip(), new.strip()))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuschedd-checkpoint-helper", description=__doc__.splitlines()[0])
    op = parser.add_mutually_exclusive_group(required=True)
    op.add_argument("--action", choices=("lock", "checkpoint", "restore", "unlock"))
    op.add_argument("--get-state", action="store_true")
    op.add_argument("--get-restore-tid", action="store_true")
    parser.add_argument("--pid", "-p", type=int, required=True)
    parser.add_argument("--timeout", "-t", type=int, default=0, help="lock timeout in milliseconds")
    parser.add_argument("--device-map", type=_device_map, default=None)
    args = parser.parse_args(argv)
    try:
        backend = DriverCheckpoint()
    except DriverUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    try:
        if args.get_state:
            print(backend.state(args.pid).value)
        elif args.get_restore_tid:
            print(backend.restore_thread_id(args.pid))
        elif args.action == "lock":
            backend.lock(args.pid, args.timeout)
        elif args.action == "checkpoint":
            backend.checkpoint(args.pid)
        elif args.action == "restore":
            backend.restore(args.pid, args.device_map)
        else:
            backend.unlock(args.pid)
    except CheckpointError as e:
        print(e.reason, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
