#!/bin/bash
# Issue 16's interposition probe, on the GPU machine: builds everything, counts the driver calls each interception
# point sees from each program against what the driver executed (CUPTI), measures the gate's cost, VMM against
# cuMemAlloc, and the injected-Python-agent alternative. Usage (from the repository root): bench/interpose_probe/run.sh OUTDIR
# Prints tables (analyze.py) into OUTDIR/tables.md; the raw per-process counts are in OUTDIR/runs.tgz.
# SECTIONS="cost vmm counts pyagent" (the default: all) picks what runs after the build.
set -u
SECTIONS=${SECTIONS:-cost vmm counts pyagent}
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; esac; return 1; }
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?OUTDIR}
root=$(pwd)
mkdir -p "$out"
b=/tmp/ipb && rm -rf $b && mkdir -p $b/shim $b/runs
exec > >(tee "$out/log.txt") 2>&1
export PATH=/usr/local/cuda/bin:$PATH TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}

echo "== environment"
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; uname -r; ldd --version | head -1
real=$(ldconfig -p | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}'); real=$(readlink -f "$real")
echo "libcuda: $real; exported functions: $(nm -D --defined-only "$real" | grep -c ' [TtiW] '); versioned: $(nm -D --defined-only "$real" | grep -c '@')"
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
tl=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
ldd "$tl/libtorch_cuda.so" | grep -i 'cuda\|cublas' | head
ls /usr/local/cuda/bin | tr '\n' ' '; echo; which nsys ncu
cupti_h=$(find /usr/local/cuda/ /usr/local/cuda/extras $($PY -c 'import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null) -name cupti.h 2>/dev/null | head -1)
echo "cupti.h: $cupti_h"

echo "== build"
cd $b
gcc -O2 -fPIC -shared -Wall -Wno-unused-parameter -o probe.so "$here/probe.c" -ldl -lpthread || exit 1
"$here/gen_shim.sh" "$real" > shim_stubs.c && head -1 shim_stubs.c
gcc -O2 -fPIC -shared -Wall -Wno-unused-parameter -DSHIM -DREAL_LIBCUDA="\"$real\"" -Wl,-soname,libcuda.so.1 \
	-o shim/libcuda.so.1 "$here/probe.c" shim_stubs.c -ldl -lpthread || exit 1
ln -sf libcuda.so.1 shim/libcuda.so
gcc -O2 -o gate_bench "$here/gate_bench.c" -lpthread
nvcc -O2 -arch=sm_90 -o nvprog "$here/nvprog.cu" -lcuda || exit 1
if [ -n "$cupti_h" ]; then
	ci=$(dirname "$cupti_h"); cl=$(dirname "$(find "$ci/.." "$ci/../lib64" "$ci/../lib" -name 'libcupti.so*' 2>/dev/null | head -1)")
	"$here/gen_cbid.sh" "$ci/cupti_driver_cbid.h" > cbid_names.h
	gcc -O2 -fPIC -shared -I"$ci" -I/usr/local/cuda/include -I. -o cupti_count.so "$here/cupti_count.c" -L"$cl" -lcupti -Wl,-rpath,"$cl" \
		&& echo "cupti_count.so built against $cl"
fi
cd "$root"

with_mode() {  # MODE CMD...: run CMD under one interception point
	local m=$1; shift
	case $m in
	none) "$@" ;;
	truth) CUDA_INJECTION64_PATH=$b/cupti_count.so "$@" ;;
	sym) LD_PRELOAD=$b/probe.so "$@" ;;
	symgpa) LD_PRELOAD=$b/probe.so PROBE_GPA=1 "$@" ;;
	full) LD_PRELOAD=$b/probe.so PROBE_GPA=1 PROBE_DLSYM=1 "$@" ;;
	gate) LD_PRELOAD=$b/probe.so PROBE_GPA=1 PROBE_DLSYM=1 PROBE_GATE=1 "$@" ;;
	gate2) LD_PRELOAD=$b/probe.so PROBE_GPA=1 PROBE_DLSYM=1 PROBE_GATE=2 "$@" ;;
	gatepark) LD_PRELOAD=$b/probe.so PROBE_GPA=1 PROBE_DLSYM=1 PROBE_GATE=1 PROBE_GATE_PARK_MS=10 "$@" ;;
	shim) LD_LIBRARY_PATH=$b/shim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PROBE_GPA=1 "$@" ;;
	esac
}

if want cost; then
echo "== cost: the gate alone (enter+exit pairs, no CUDA)"
for sh in 0 1; do for t in 1 4 8; do $b/gate_bench 20000000 $t $sh; done; done
echo "== cost: launch-bound loops (modes interleaved; compare the best of the rounds)"
mkdir -p $b/cost
for round in 1 2 3 4 5; do
	for m in none full gate gate2 gatepark; do
		echo "round $round mode $m: $(PROBE_DIR=$b/cost with_mode $m timeout 60 $b/nvprog bench 200000 1)"
		echo "round $round mode $m: $(PROBE_DIR=$b/cost with_mode $m timeout 60 $b/nvprog bench 50000 4)"
	done
done
grep -h 'parks' $b/cost/probe.*.txt | head -5
for round in 1 2 3 4; do
	for m in none full gate gate2; do
		echo "round $round mode $m: $(with_mode $m timeout 90 $PY "$here/torch_prog.py" bench 50000 | tail -1)"
	done
done
fi
if want vmm; then
echo "== cost: VMM against cuMemAlloc"
timeout 120 $b/nvprog vmm
fi

if want counts; then
echo "== counts"
run() {  # NAME CMD...
	local name=$1; shift
	timeout 150 "$@" > /dev/null 2>&1  # warm-up: torch.compile's first run compiles and autotunes
	for m in truth sym symgpa full shim; do
		local d=$b/runs/$name/$m; mkdir -p "$d"
		local t0=$(date +%s%N)
		PROBE_DIR=$d with_mode $m timeout 150 "$@" > "$d/stdout" 2>&1; local rc=$?
		printf '%-10s %-7s rc=%d %ss %s\n' "$name" "$m" $rc "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "$(tail -1 "$d/stdout")"
	done
}
run nv_count $b/nvprog count 1000
run nv_async $b/nvprog async 1000
run nv_graph $b/nvprog graph 100
run nv_driver $b/nvprog vmm
run t_basic $PY "$here/torch_prog.py" basic 100
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run t_expand $PY "$here/torch_prog.py" basic 100
run t_compile $PY "$here/torch_prog.py" compile 100
run t_graph $PY "$here/torch_prog.py" graph 100
tar czf "$out/runs.tgz" -C $b runs
$PY "$here/analyze.py" $b/runs > "$out/tables.md"; cat "$out/tables.md"
fi

if want pyagent; then
echo "== injected Python agent"
PYTHONPATH=$root/src timeout 150 $PY "$here/torch_prog.py" pyagent
fi
echo "== done $(date -u)"
