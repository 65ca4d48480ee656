#!/bin/bash
# The transparent fast path's proof on the GPU machine, in one go (docs/fast-path.md, docs/gpu-results.md):
# builds the interposer and the CUDA program, then runs bench/transparent/run.py on each program. Usage, from the
# repository root: bench/transparent/gpu.sh OUTDIR [SRC]  (SRC: where native/ and bench/transparent/ are; default .)
# SECTIONS picks what runs (default "cuda torch cost"): also `copy` (piece sizes, thread counts), `bench`
# (bench/bench.py: serve.py unmodified, the inject rows; BENCH_SIZES, BENCH_PATHS) and
# `daemon` (tests/gpu/test_daemon_gpu.py under a real systemd: needs .carry/gpu and .carry/site, see
# docs/gpu-results.md).
set -u
out=${1:?OUTDIR}; src=${2:-.}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PATH=/usr/local/cuda/bin:$PATH PYTHONPATH=$(pwd)/src PYTHONUNBUFFERED=1
b=/tmp/transparent && mkdir -p $b
date -u; nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
make -s -C "$src" preload PRELOAD_OUT=$b || exit 1
export PRELOAD=$b/libgpuschedd-preload.so
nvcc -O2 -arch=sm_90 -o $b/cuprog "$src/bench/transparent/cuprog.cu" || exit 1
t=$src/bench/transparent/run.py
want() { case " ${SECTIONS:-cuda torch cost} " in *" $1 "*) return 0 ;; esac; return 1; }
if want cuda; then
echo "== cuda malloc"; timeout 120 python3 $t cuda $b/cuprog malloc
echo "== cuda async"; timeout 120 python3 $t cuda $b/cuprog async
fi
if want torch; then
echo "== torch 0.5B, expandable segments, graph, torch.compile"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 200 python3 $t torch 0.5B compile --cycles 2
echo "== torch 7B"; timeout 240 python3 $t torch 7B --cycles ${CYCLES:-3}
fi
if want cost; then
echo "== running cost, 7B"; timeout 300 python3 $t cost 7B --rounds ${ROUNDS:-3}
fi
if want bench; then
echo "== bench.py, serve.py unmodified"
make -s -C "$src" preload || exit 1
timeout 420 python3 "$src/bench/bench.py" --sizes "${BENCH_SIZES:-0.5B,1.5B,7B}" \
	--paths "${BENCH_PATHS:-inject,inject-only}" --runs 3 --cold-runs 1 --thp madvise
fi
if want daemon; then
echo "== the daemon under systemd"
GPU_PYTHON=/opt/torch/.venv/bin/python3 timeout 300 "$src/tools/gpu-sandbox.sh" with "$src/.carry/gpu" \
	env PYTHONPATH="$src/.carry/site" /opt/torch/.venv/bin/python3 -m pytest -p no:cacheprovider -v -s \
	"$src/tests/gpu/test_daemon_gpu.py"
fi
if want copy; then
for cfg in "16 8192" "16 2048" "12 4096"; do
	set -- $cfg
	echo "== copy: $1 threads, $2 KiB pieces"
	GPUSCHED_PRELOAD_THREADS=$1 GPUSCHED_PRELOAD_CHUNK_KIB=$2 timeout 120 python3 $t torch 7B --cycles 1
done
fi
date -u
