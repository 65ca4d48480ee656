"""The daemon's RSS across refused 1 MiB Runs (issue 15.6), against the installed daemon in the sandbox:

    SYSD_NAME=gs-bench SYSD_NETNS=1 SYSD_BIND="$PWD" tools/sandbox.sh with .venv/bin/python bench/rejected_runs_rss.py

alice (in the group gpusched) and bob (not) each send rounds of 50 Runs whose argv is just over the 1 MiB bound,
one after another on one connection; the RSS of gpuschedd.service is printed after each round.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "system"))

from secutil import ALICE, BOB, calls_as, ensure_users, manager
from sysutil import in_sandbox, install_project, run

ROUND = 50
ARGV = ["x" * 65535] * 17  # 1.06 MiB: over the bound


def rss_mib() -> int:
    pid = run("systemctl", "show", "-P", "MainPID", "gpuschedd.service").stdout.strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    if not in_sandbox():
        print(__doc__, file=sys.stderr)
        return 2
    install_project()
    ensure_users()
    run("systemctl", "restart", "gpuschedd.service")
    print(f"{'after':>24} {'RSS MiB':>8}  errors")
    print(f"{'start':>24} {rss_mib():8}")
    sent = 0
    for user in (ALICE, ALICE, BOB, BOB, ALICE, ALICE):
        replies = calls_as(user, [manager("Run", "sasa{sv}", f"big{i}", ARGV, {}) for i in range(ROUND)])
        sent += ROUND
        print(f"{f'{sent} Runs ({user})':>24} {rss_mib():8}  {sorted({r.error or 'ok' for r in replies})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
