"""Prometheus exposition from the engine's events and live state."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

from fake_units import FakeUnits
from prometheus_client.parser import text_string_to_metric_families

from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.metrics import Metrics
from gpuschedd.options import RunOptions
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


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, parsed by prometheus_client's own parser (which rejects a malformed one)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def test_exposition(tmp_path: Path) -> None:
    metrics, _ = await metrics_after_a_cycle(tmp_path)
    text = metrics.render()
    got = samples(text)
    assert got[sample("gpusched_model_state", model="llama", state="frozen")] == 1
    assert got[sample("gpusched_model_state", model="llama", state="running")] == 0
    assert got[sample("gpusched_events_total", model="llama", event="freeze")] == 2
    assert got[sample("gpusched_events_total", model="llama", event="thaw")] == 1
    assert got[sample("gpusched_transition_seconds_count", model="llama", event="freeze")] == 2
    assert got[sample("gpusched_transition_seconds_bucket", model="llama", event="freeze", le="+Inf")] == 2
    assert got[sample("gpusched_gpu_memory_free_bytes", gpu="GPU-0000", index="0")] == 75161927680
    assert got[sample("gpusched_ram_budget_bytes")] == 64 << 30
    # Every family is declared with HELP and TYPE (the parser calls an undeclared one "unknown"); no *_created.
    for family in text_string_to_metric_families(text):
        assert family.type != "unknown" and family.documentation, family.name
    assert not [name for name, _ in got if name.endswith("_created")]
    # The textfile follows every event.
    assert (tmp_path / "gpuschedd.prom").read_text() == text


def fetch(url: str, accept: str = "") -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


async def test_http_endpoint(tmp_path: Path) -> None:
    metrics, _ = await metrics_after_a_cycle(tmp_path)
    server = await metrics.serve("127.0.0.1:0")
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        # The scrape runs in the server's thread and reads the engine on this loop: it must stay free meanwhile.
        kind, body = await asyncio.to_thread(fetch, url)
        assert kind.startswith("text/plain; version=0.0.4")
        assert samples(body)[sample("gpusched_model_state", model="llama", state="frozen")] == 1
        assert body == metrics.render()
        # Content negotiation: a scraper asking for OpenMetrics gets it.
        kind, body = await asyncio.to_thread(fetch, url, "application/openmetrics-text; version=1.0.0")
        assert kind.startswith("application/openmetrics-text")
        assert 'gpusched_events_total{event="freeze",model="llama"} 2.0' in body.splitlines()
        assert body.endswith("# EOF\n")
    finally:
        server.shutdown()
        server.server_close()


async def test_textfile_follows_no_link(tmp_path: Path) -> None:
    """The textfile is replaced, never written through a link: neither one at the target's name nor one planted at
    a temporary name the daemon might use (the old writer's name was PATH.PID.tmp, opened following links)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    textfile = tmp_path / "gpuschedd.prom"
    textfile.symlink_to(victim)
    (tmp_path / f"gpuschedd.prom.{os.getpid()}.tmp").symlink_to(victim)
    await metrics_after_a_cycle(tmp_path)
    assert victim.read_text() == "precious\n"
    assert not textfile.is_symlink()
    assert textfile.stat().st_mode & 0o777 == 0o644
    assert samples(textfile.read_text())[sample("gpusched_model_state", model="llama", state="frozen")] == 1
    # no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpuschedd.prom",
        f"gpuschedd.prom.{os.getpid()}.tmp",
        "victim",
    ]
