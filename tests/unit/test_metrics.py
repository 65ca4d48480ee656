"""Prometheus exposition from the engine's events and live state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fake_units import FakeUnits

from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine, RunOptions
from gpuschedd.metrics import Metrics
from gpuschedd.telemetry import GpuInfo


class OneGpu:
    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo("GPU-0000", 0, "Test GPU", 80 << 30, 10 << 30, 70 << 30)]

    def vram_by_pid(self) -> dict[int, dict[str, int]]:
        return {}


async def metrics_after_a_cycle(tmp_path: Path) -> tuple[Metrics, Engine]:
    engine = Engine(FakeUnits(), NoCheckpoint(), OneGpu(), Config(ram_budget_bytes=64 << 30))
    metrics = Metrics(engine, textfile=str(tmp_path / "gpuschedd.prom"))
    engine.add_listener(metrics)
    await engine.start()
    await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("llama")
    await engine.thaw("llama")
    await engine.freeze("llama")
    return metrics, engine


async def test_exposition(tmp_path: Path) -> None:
    metrics, _ = await metrics_after_a_cycle(tmp_path)
    text = metrics.render()
    lines = set(text.splitlines())
    assert 'gpusched_model_state{model="llama",state="frozen"} 1' in lines
    assert 'gpusched_model_state{model="llama",state="running"} 0' in lines
    assert 'gpusched_events_total{model="llama",event="freeze"} 2' in lines
    assert 'gpusched_events_total{model="llama",event="thaw"} 1' in lines
    assert 'gpusched_transition_seconds_count{model="llama",event="freeze"} 2' in lines
    assert 'gpusched_transition_seconds_bucket{model="llama",event="freeze",le="+Inf"} 2' in lines
    assert 'gpusched_gpu_memory_free_bytes{gpu="GPU-0000",index="0"} 75161927680' in lines
    assert f"gpusched_ram_budget_bytes {64 << 30}" in lines
    # Every sample belongs to a family declared with HELP and TYPE.
    declared = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if not line.startswith("#"):
            name = line.split("{")[0].split()[0]
            assert name in declared or name.rsplit("_", 1)[0] in declared, line
    # The textfile follows every event.
    assert (tmp_path / "gpuschedd.prom").read_text() == text


async def test_http_endpoint(tmp_path: Path) -> None:
    metrics, _ = await metrics_after_a_cycle(tmp_path)
    server = await metrics.serve("127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]
    try:
        for path, status in (("/metrics", b"200 OK"), ("/other", b"404 Not Found")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            reply = await reader.read()
            writer.close()
            assert reply.split(b"\r\n")[0] == b"HTTP/1.0 " + status
            if status == b"200 OK":
                assert b'gpusched_model_state{model="llama",state="frozen"} 1' in reply
    finally:
        server.close()
        await server.wait_closed()
