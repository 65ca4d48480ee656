#!/usr/bin/python3
"""A stand-in "model" for demos and system tests: work that can be seen to stop and go on.

Usage: counter.py FILE [INTERVAL_SECONDS]

Every INTERVAL (default 1 s) it adds one to a counter and writes it to FILE (atomically, so a reader never sees a
half-written number, even when the process is frozen mid-write); once a second it prints it, so the journal of the
unit shows it too without flooding it when tests count fast. Frozen, the number in FILE stops; thawed, it goes on
from where it was. Only the standard library: it runs under any python3, outside the project's environment.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = argv[1]
    interval = float(argv[2]) if len(argv) == 3 else 1.0
    tmp = f"{path}.tmp"
    count = 0
    printed = 0.0
    while True:
        count += 1
        with open(tmp, "w") as f:
            f.write(f"{count}\n")
        os.replace(tmp, path)
        now = time.monotonic()
        if now - printed >= 1.0:
            print(f"count {count}", flush=True)
            printed = now
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
