#!/bin/bash
# Overlapped swaps on the GPU machine, in one go (docs/gpu-results.md): builds the interposer for the InjectAgent
# path, then runs bench/swap/run.py for two 1.5B-shaped and two 7B-shaped models on the driver, agent and inject
# paths: sequential (Freeze then Thaw) against Swap, tensors verified after. About 5 minutes on an H200.
# Usage, from the repository root, as root: bench/swap/gpu.sh OUTDIR
set -u
out=${1:?OUTDIR}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PATH=/usr/local/cuda/bin:$PATH PYTHONPATH=$(pwd)/src PYTHONUNBUFFERED=1
b=/tmp/swap-bench && mkdir -p $b
date -u; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
make -s preload PRELOAD_OUT=$b || exit 1
for cfg in "1.5B 3 150" "7B 2 300"; do
	set -- $cfg
	echo "== $1: $2 runs per path"
	timeout "$3" python3 bench/swap/run.py --sizes "$1" --runs "$2" --preload $b/libgpuschedd-preload.so \
		--workdir /var/tmp/gpusched-swap-bench 2> "$out/engine-$1.log" | tee "$out/table-$1.md"
	echo "rc=${PIPESTATUS[0]}"; tail -5 "$out/engine-$1.log"
done
date -u
