"""Build the fake libcuda with gcc: `python tests/fakecuda/build.py OUTDIR` (no Makefile needed).
Writes OUTDIR/libcuda.so.1 and OUTDIR/nockpt/libcuda.so.1 (a driver without the checkpoint API)."""

from __future__ import annotations

import os
import subprocess
import sys

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakecuda.c")


def build(outdir: str, checkpoint_api: bool = True) -> str:
    """Compile fakecuda.c into outdir/libcuda.so.1 (outdir/nockpt/ without the checkpoint API)."""
    target_dir = outdir if checkpoint_api else os.path.join(outdir, "nockpt")
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, "libcuda.so.1")
    flags = [] if checkpoint_api else ["-DFAKECUDA_NO_CHECKPOINT"]
    cc = os.environ.get("CC", "gcc")
    subprocess.run(
        [cc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-shared", "-fPIC", *flags, "-o", target, SOURCE],
        check=True,
    )
    return target


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "build/fakecuda"
    print(build(out))
    print(build(out, checkpoint_api=False))
