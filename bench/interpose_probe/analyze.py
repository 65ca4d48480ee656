"""Tables from the probe's per-process counts: RUNS/<program>/<mode>/{cupti,probe}.PID.txt -> markdown on stdout.

For each program: what the driver executed (CUPTI, mode "truth") against what each interception point saw, per
function family (cuMemAlloc_v2 and cuMemAlloc_v2_ptds count as one), and which families a point missed."""

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

MODES = ["truth", "sym", "symgpa", "full", "shim"]
FAMILIES = {
    "alloc": r"cuMemAlloc(_v2|Pitch_v2|Managed)?$",
    "alloc async/pool": r"cuMemAlloc(Async|FromPoolAsync)",
    "free": r"cuMemFree(_v2)?$",
    "free async": r"cuMemFreeAsync",
    "VMM create/map/access": r"cuMem(Create|Map|SetAccess|AddressReserve)$",
    "VMM unmap/release": r"cuMem(Unmap|Release|AddressFree)$",
    "kernel launch": r"cuLaunch(Kernel|KernelEx|CooperativeKernel)$",
    "host func": r"cuLaunchHostFunc$",
    "graph launch": r"cuGraphLaunch$",
    "memcpy": r"cuMemcpy",
    "memset": r"cuMemset",
    "sync (stream/ctx/event)": r"cu(StreamSynchronize|CtxSynchronize|EventSynchronize)$",
    "module/library load": r"cu(ModuleLoadData|ModuleLoadDataEx|LibraryLoadData)$",
}


def base(name: str) -> str:
    return re.sub(r"(_v\d)?(_ptsz|_ptds)?$", "", re.sub(r"_ptsz|_ptds", "", name)).removesuffix("_v2")


def family(name: str) -> str | None:
    b = base(name)
    for fam, rx in FAMILIES.items():
        if re.match(rx, b):
            return fam
    return None


def load(d: Path) -> tuple[Counter, Counter, list[str]]:
    """(counts by family, counts by origin, notes) summed over every process of one run."""
    fams, origins, notes = Counter(), Counter(), []
    for f in sorted(d.glob("*.txt")):
        for line in f.read_text().splitlines():
            p = line.split()
            if p[:1] == ["count"]:
                fam = family(p[2])
                if fam:
                    fams[fam] += int(p[3])
                    origins[p[1]] += int(p[3])
            elif p[:1] in (["gpa_unswapped"], ["dlsym_name"]) or (p[:1] == ["stat"] and p[1] == "dlsym_rtld_next"):
                notes.append(f"{f.name.split('.')[1]}: {line}")
    return fams, origins, notes


def main(runs: Path) -> None:
    summary = defaultdict(dict)
    for prog in sorted(p for p in runs.iterdir() if p.is_dir()):
        data = {m: load(prog / m) for m in MODES if (prog / m).is_dir()}
        truth = data.get("truth", (Counter(), Counter(), []))[0]
        print(f"\n### {prog.name}\n\n| family | " + " | ".join(data) + " |\n|---|" + "---|" * len(data))
        fams = [f for f in FAMILIES if any(data[m][0][f] for m in data)]
        for fam in fams:
            print(f"| {fam} | " + " | ".join(str(data[m][0][fam]) for m in data) + " |")
        print(
            "| *seen via (origin)* | "
            + " | ".join(", ".join(f"{o} {n}" for o, n in sorted(data[m][1].items())) or "-" for m in data)
            + " |"
        )
        for m in data:
            if m == "truth":
                continue
            missed = [f for f in fams if data[m][0][f] < truth[f]]
            summary[prog.name][m] = (
                "all" if not missed else "misses " + ", ".join(f"{f} ({data[m][0][f]}/{truth[f]})" for f in missed)
            )
        names = sorted({n.split(": ", 1)[1] for m in data for n in data[m][2] if "dlsym_name" in n})
        if names:
            print(f"\ndlsym'd from libcuda by name: {' '.join(x.split()[1] for x in names)}")
        miss = sorted(
            {
                n.split(": ", 1)[1]
                for m in ("symgpa", "full", "shim")
                if m in data
                for n in data[m][2]
                if "gpa_unswapped" in n
            }
        )
        if miss:
            print(
                "\ncuGetProcAddress answers not swapped (not in the tracked table): "
                + "; ".join(x.removeprefix("gpa_unswapped ") for x in miss)
            )
    print(
        "\n### Summary: what each point misses against CUPTI\n\n| program | "
        + " | ".join(MODES[1:])
        + " |\n|---|"
        + "---|" * (len(MODES) - 1)
    )
    for prog, row in summary.items():
        print(f"| {prog} | " + " | ".join(row.get(m, "-") for m in MODES[1:]) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
