#!/bin/bash
# Why Open MPI's singleton init ("Unable to start a daemon on the local node") fails in a model but not in a shell on
# the GPU machine (issue 20, docs/models.md). Usage, from the repository root: bench/packaging/mpi-gpu.sh OUTDIR
#
# A model's unit starts from systemd's environment (PATH=/usr/local/sbin:...:/bin, LANG, and since this branch HOME,
# USER, LOGNAME, SHELL), not the caller's. This runs MPI_Init in a shell, then under `env -i` with only what a model
# gets (no systemd needed: the environment is the difference that matters here; the sandbox reproduction of the
# rest is tests/system/test_real_programs.py), then adds the shell's variables one at a time, so the output names the
# variable(s) the model lacked: pass them with `gpusched run -E NAME`. About 1 minute; no GPU memory used.
set -u
out=${1:?OUTDIR}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
date -u
init='from mpi4py import MPI; print("mpi size", MPI.COMM_WORLD.Get_size())'
python=
for candidate in ${PYTHONS:-python3 /opt/torch/.venv/bin/python3 /usr/bin/python3}; do
	if "$candidate" -c 'import mpi4py' 2> /dev/null; then python=$(command -v "$candidate"); break; fi
done
if [ -z "$python" ]; then
	echo "RESULT: no python with mpi4py here (tried ${PYTHONS:-python3 /opt/torch/.venv/bin/python3 /usr/bin/python3})"
	exit 0
fi
echo "== python with mpi4py: $python"
"$python" -c 'import mpi4py; print(mpi4py.__file__); print(mpi4py.get_config())' 2>&1
"$python" -c 'from mpi4py import MPI; print(MPI.Get_library_version())' 2>&1 | head -3
echo "== programs"; for p in orted prte mpirun ssh rsh; do printf '%-7s %s\n' "$p" "$(command -v $p || echo -)"; done
[ -n "$(command -v orted)" ] && ldd "$(command -v orted)" | grep -i "not found\|mpi\|open-\|pmix" | head
echo "== the shell's environment (names; values of the MPI-related ones)"
env | sort | sed -E 's/^((OMPI|OPAL|PMIX|PRTE|UCX|HWLOC|LD_LIBRARY_PATH|PATH|HOME|TMPDIR|CONDA)[A-Z_]*=.*)$/\1/; t; s/=.*//'
echo "== ulimits"; ulimit -a | grep -i "locked\|open files\|processes"

attempt() {   # attempt LABEL ENV...: MPI_Init under env -i with ENV; prints ok or the failure's last lines
	local label=$1; shift
	local log; log=$(cd / && timeout 60 env -i "$@" "$python" -c "$init" 2>&1 < /dev/null)
	if printf '%s\n' "$log" | grep -q "mpi size 1"; then echo "ok    $label"; return 0; fi
	echo "FAIL  $label: $(printf '%s\n' "$log" | grep -v '^\s*$' | grep -i 'error\|unable\|not found\|fail' | head -2 | tr '\n' ' ')"
	return 1
}
model_env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "LANG=C.UTF-8" "HOME=$HOME"
	"USER=$(id -un)" "LOGNAME=$(id -un)" "SHELL=${SHELL:-/bin/sh}")
echo "== MPI_Init"
attempt "in this shell, its whole environment" $(env | grep -v '[[:space:]]' | sort) || true
if attempt "with a model's environment (systemd's PATH, HOME, USER, LOGNAME, SHELL, LANG)" "${model_env[@]}"; then
	echo "RESULT: the environment is not the difference here"
	exit 0
fi
attempt "model's + the shell's PATH" "${model_env[@]}" "PATH=$PATH" || true
fixes=()
for name in $(env | sed 's/=.*//' | grep -v '^_$' | sort); do
	value=$(printenv "$name")
	case "$value" in *[[:space:]]*) continue ;; esac
	attempt "model's + $name" "${model_env[@]}" "$name=$value" > /dev/null && fixes+=("$name")
done
echo "one variable added to the model's environment that makes MPI_Init work: ${fixes[*]:-none}"
if [ ${#fixes[@]} -eq 0 ]; then
	relevant=$(env | grep -E '^(PATH|LD_LIBRARY_PATH|OPAL_|OMPI_|PMIX_|PRTE_|UCX_|HWLOC_|CONDA_PREFIX|VIRTUAL_ENV)' | grep -v '[[:space:]]')
	attempt "model's + every MPI-, path- and venv-related variable of the shell" "${model_env[@]}" $relevant || true
fi
echo "RESULT: model lacks: ${fixes[*]:-see the lines above}"
date -u
