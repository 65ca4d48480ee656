"""Where the transparent fast path's LD_PRELOAD library (native/preload, docs/fast-path.md) is installed: in the
private lib dir, next to the Python directory the launchers put on sys.path (PKGLIBDIR/python/gpuschedd/ →
PKGLIBDIR/libgpuschedd-preload.so; `make install` and the packages put both there)."""

from __future__ import annotations

from pathlib import Path

LIBRARY_NAME = "libgpuschedd-preload.so"


def library_path() -> str:
    return str(Path(__file__).resolve().parent.parent.parent / LIBRARY_NAME)
