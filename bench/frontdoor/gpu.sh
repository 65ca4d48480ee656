#!/bin/bash
# The front door's proof on the GPU machine (docs/frontdoor.md): request -> first token through gpusched-frontdoor
# for a cold, warm, frozen (thaw) and swapped-out model, driver path and agent path, with the official openai client.
# Boots tools/gpu-sandbox.sh's guest (systemd, dbus, polkitd), installs the project there (make install: the daemon,
# the front door's units, user and polkit rule), runs bench/frontdoor/run.py inside, and tears the guest down.
#
#   bench/frontdoor/gpu.sh OUTDIR [CARRY]    from the repository root, as root; CARRY: tools/gpu-sandbox.sh fetch's
#                                            folder (default .carry/gpu); its wheels/ must also hold aiohttp's (make
#                                            install needs it) and openai's (the bench's client) Python 3.12 wheels:
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d CARRY/wheels aiohttp openai
# Knobs: SIZE (0.5B), CYCLES (5), PATHS (driver,agent), TORCH_PY (/opt/torch/.venv/bin/python3, else python3).
# About 3-5 minutes; hard limit 450 s for the bench itself. Output: OUTDIR/log.txt, table.md, requests.jsonl,
# journal.txt.
set -u
out=$(mkdir -p "${1:?OUTDIR}" && cd "$1" && pwd)
carry=$(cd "${2:-.carry/gpu}" && pwd) || exit 1
exec > >(tee "$out/log.txt") 2>&1
repo=$(pwd)
torch_py=${TORCH_PY:-/opt/torch/.venv/bin/python3}
[ -x "$torch_py" ] || torch_py=$(command -v python3)
date -u; nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
ls "$carry"/wheels/aiohttp-*cp312*.whl "$carry"/wheels/openai-*.whl > /dev/null || {
	echo "gpu.sh: $carry/wheels lacks aiohttp or openai (the pip download line at the top of $0)"; exit 1; }
export SYSD_BIND="$out"
tools/gpu-sandbox.sh up "$carry" || exit 1
trap 'tools/gpu-sandbox.sh exec journalctl --no-pager -o short-precise -u gpuschedd -u "gpusched-*" > "$out/journal.txt" 2>&1; tools/gpu-sandbox.sh down' EXIT
tools/gpu-sandbox.sh install "$carry" || exit 1
# the client (openai) for the bench, beside the installed daemon's private packages
tools/gpu-sandbox.sh exec python3 -m pip install -q --disable-pip-version-check --no-index --find-links "$carry/wheels" \
	--target /var/tmp/fd-client openai || exit 1
tools/gpu-sandbox.sh exec env PYTHONPATH="/var/tmp/fd-client:/usr/lib/gpuschedd/python:$repo/src" TORCH_PY="$torch_py" \
	PYTHONUNBUFFERED=1 timeout 450 "$torch_py" "$repo/bench/frontdoor/run.py" "$out" --size "${SIZE:-0.5B}" \
	--cycles "${CYCLES:-5}" --paths "${PATHS:-driver,agent}"
rc=$?
date -u
exit $rc
