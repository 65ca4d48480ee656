"""The fast path's in-process agent for PyTorch models (opt in: `gpusched run --agent`, Run option Agent=true).

In the model's code, once, before the model is loaded:

    import gpuschedd.agent
    agent = gpuschedd.agent.enable()
    with agent.parkable():          # what any thread allocates here is parked on a freeze
        model = AutoModelForCausalLM.from_pretrained(..., device_map="cuda")
    while True:
        request = next_request()
        with agent.busy():          # a freeze waits for the request; the next one waits for the thaw
            answer = model.generate(...)

On freeze, gpuschedd asks the agent to park: it copies the model's CUDA memory into host RAM at PCIe speed and
releases it, keeping every address; the driver's checkpoint then moves only what is left (the CUDA context,
activations, CUDA graphs). On thaw, the reverse. Without gpuschedd (no $GPUSCHED_AGENT_DIR) the memory is
parkable but nothing is ever parked. This package imports neither D-Bus nor (until enable) PyTorch."""

from __future__ import annotations

import os
import threading

from .protocol import AGENT_DIR_ENV, daemon_uid
from .server import Agent

STAGING_ENV = "GPUSCHED_AGENT_STAGING"

_agent: Agent | None = None
_lock = threading.Lock()


def enable() -> Agent:
    """Serve the daemon, with a pool of parkable memory for PyTorch (`Agent.parkable()`). Idempotent."""
    global _agent
    with _lock:
        if _agent is None:
            from .cuda import Cuda
            from .parking import ParkingLot
            from .staging import DEFAULT_MODE
            from .torch_pool import TorchPool

            lot = ParkingLot(Cuda(), mode=os.environ.get(STAGING_ENV, DEFAULT_MODE))
            pool = TorchPool(lot)
            _agent = Agent(
                lot, os.environ.get(AGENT_DIR_ENV), daemon_uid(), before_park=pool.release_cache, routing=pool.routing
            )
            _agent.start()
        return _agent
