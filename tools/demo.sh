#!/bin/bash
# demo.sh — a narrated tour of gpuschedd: install it the way a package would, run two models, freeze one (its
# counter stops, its cgroup reports frozen), swap, thaw, look at it with systemctl, busctl and journalctl, stop.
#
# `make demo` runs it inside a throw-away systemd sandbox (tools/sandbox.sh with ...): nothing on the host changes.
# It refuses to run anywhere else, because it installs into / and starts a system service.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "$(cat /run/systemd/container 2>/dev/null)" != sysd-sandbox ] && [ "${GPUSCHED_DEMO_HERE:-}" != 1 ]; then
	echo "demo.sh installs into / : run it through 'make demo' (or set GPUSCHED_DEMO_HERE=1 on a scratch machine)" >&2
	exit 2
fi

bold=$(printf '\033[1m') off=$(printf '\033[0m')
[ -t 1 ] || { bold=""; off=""; }
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
show() { printf '%s$ %s%s\n' "$bold" "$*" "$off"; "$@"; }
count() { cat "/run/gpusched-demo/$1.count"; }

cleanup() {
	gpusched stop llama >/dev/null 2>&1 || true
	gpusched stop mistral >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "Install (make install: the shipped unit, D-Bus policy and activation file, private Python package)"
make --no-print-directory -s install PREFIX=/usr PYTHON=/usr/bin/python3 \
	PIP_FLAGS="--no-index --find-links build/wheels" >/dev/null
make --no-print-directory -s post-install PREFIX=/usr
show systemctl start gpuschedd.service
show systemctl status --no-pager --lines=3 gpuschedd.service || true

mkdir -p /run/gpusched-demo
say "Two models: a counter each (examples/counter.py writes +1 per second to a file)"
show gpusched run --name llama --description "Llama (demo counter)" -- \
	/usr/bin/python3 "$REPO/examples/counter.py" /run/gpusched-demo/llama.count
show gpusched run --name mistral --description "Mistral (demo counter)" -- \
	/usr/bin/python3 "$REPO/examples/counter.py" /run/gpusched-demo/mistral.count
sleep 2
show gpusched status

say "Freeze llama: its counter stops, the kernel reports its cgroup frozen"
show gpusched freeze llama
cg=/sys/fs/cgroup$(systemctl show -P ControlGroup gpusched-model@llama.service)
a=$(count llama); sleep 2; b=$(count llama)
echo "llama counter: $a, two seconds later: $b"
show grep frozen "$cg/cgroup.events"
show systemctl show -p FreezerState gpusched-model@llama.service
show busctl get-property org.gpusched1 /org/gpusched1/model/llama org.gpusched1.Model State

say "Swap: freeze mistral and thaw llama, both or neither"
show gpusched swap mistral llama
show gpusched list
a=$(count llama); sleep 1.5; b=$(count llama)
echo "llama counter: $a, then $b (running again)"

say "Thaw mistral"
show gpusched thaw mistral
show systemctl status --no-pager --lines=5 gpusched-model@llama

say "The model object on the bus (what GUIs and scripts use)"
show busctl introspect --no-pager org.gpusched1 /org/gpusched1/model/llama
show gdbus call --system --dest org.gpusched1 --object-path /org/gpusched1 \
	--method org.gpusched1.Manager.ListModels

say "Every state change is one structured journal entry"
show journalctl --no-pager -o cat GPUSCHED_MODEL=llama
show journalctl --no-pager -o verbose -n 1 GPUSCHED_MODEL=llama
say "... and shows up with the model's own unit too (OBJECT_SYSTEMD_UNIT=)"
show journalctl --no-pager -n 6 -u gpusched-model@llama

say "Stop both"
show gpusched stop llama
show gpusched stop mistral
show gpusched list
