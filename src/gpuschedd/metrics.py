"""Prometheus metrics of what gpuschedd manages: per model state, VRAM, snapshot bytes (and their part paged out to
swap), freeze/thaw/page-out counts and duration histograms; per GPU memory; host RAM parked in frozen models; swap.

Off by default. `MetricsListen=127.0.0.1:9835` serves them over HTTP through prometheus_client's server (any path;
the text format or OpenMetrics as the scraper's Accept header asks, gzip when accepted; no TLS, no auth, so bind it
where only the scraper reaches; the shipped unit has no network, see docs/configuration.md for the drop-in),
`MetricsTextfile=PATH` writes them atomically after every event for node_exporter's textfile collector."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import hostmem
from .engine import Engine
from .events import EngineListener, Event, EventKind
from .model import State

log = logging.getLogger(__name__)

# Seconds: from sub-second freezes of small models to the ~10 s of a 7B model on the driver path.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TIMED = (EventKind.FREEZE, EventKind.THAW, EventKind.PAGE_OUT)
# How long the HTTP server's thread waits for the event loop to read the engine.
SCRAPE_TIMEOUT_S = 10


class EngineState(Collector):
    """The gauges read from the engine's live state at scrape time. The engine belongs to the event loop, so a
    scrape from the HTTP server's thread reads it there rather than racing the loop's changes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterator[Metric]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self.loop is not None:
                return iter(asyncio.run_coroutine_threadsafe(self._read(), self.loop).result(SCRAPE_TIMEOUT_S))
        return iter(self.families())

    async def _read(self) -> list[Metric]:
        return self.families()

    def families(self) -> list[Metric]:
        models = list(self.engine.models.values())
        state = GaugeMetricFamily("gpusched_model_state", "1 for the state the model is in", labels=["model", "state"])
        vram = GaugeMetricFamily("gpusched_model_vram_bytes", "GPU memory the model's processes hold", labels=["model"])
        snapshot = GaugeMetricFamily(
            "gpusched_model_snapshot_bytes", "host RAM the frozen model's GPU state takes", labels=["model"]
        )
        swapped = GaugeMetricFamily(
            "gpusched_model_snapshot_swap_bytes", "the part of the snapshot paged out to swap", labels=["model"]
        )
        spilled = GaugeMetricFamily(
            "gpusched_model_snapshot_file_bytes", "the part of the snapshot in spill files", labels=["model"]
        )
        for m in models:
            for s in State:
                state.add_metric([m.name, str(s)], int(m.state == s))
            vram.add_metric([m.name], m.vram_bytes)
            snapshot.add_metric([m.name], m.snapshot_bytes)
            swapped.add_metric([m.name], m.snapshot_in_swap())
            spilled.add_metric([m.name], m.snapshot_in_files())
        out: list[Metric] = [state, vram, snapshot, swapped, spilled]
        gpus = self.engine.telemetry.gpus()
        for name, attr, text in (
            ("gpusched_gpu_memory_total_bytes", "total_bytes", "GPU memory in all"),
            ("gpusched_gpu_memory_used_bytes", "used_bytes", "GPU memory in use"),
            ("gpusched_gpu_memory_free_bytes", "free_bytes", "GPU memory free"),
        ):
            family = GaugeMetricFamily(name, text, labels=["gpu", "index"])
            for g in gpus:
                family.add_metric([g.uuid, str(g.index)], getattr(g, attr))
            out.append(family)
        out.append(
            GaugeMetricFamily(
                "gpusched_ram_frozen_bytes", "host RAM parked in frozen models", value=self.engine.ram_frozen_bytes()
            )
        )
        out.append(
            GaugeMetricFamily("gpusched_ram_budget_bytes", "RamBudget=", value=self.engine.config.ram_budget_bytes)
        )
        total, free = hostmem.swap_bytes()
        out.append(GaugeMetricFamily("gpusched_swap_total_bytes", "the host's swap (SwapTotal)", value=total))
        out.append(GaugeMetricFamily("gpusched_swap_free_bytes", "the host's free swap (SwapFree)", value=free))
        return out


class Metrics(EngineListener):
    """Counts events as the engine emits them; the rest is read from the engine's live state when scraped."""

    def __init__(self, engine: Engine, textfile: str = "") -> None:
        # No *_created series: a scraper learns nothing from the daemon's start time per label set.
        prometheus_client.disable_created_metrics()
        self.textfile = textfile
        self.registry = CollectorRegistry()
        self.state = EngineState(engine)
        self.registry.register(self.state)
        self.events = Counter(
            "gpusched_events",
            "events per model and kind (run, freeze, thaw, refusal, ...)",
            ["model", "event"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "gpusched_transition_seconds",
            "how long freezes, thaws and page-outs took",
            ["model", "event"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def event(self, event: Event) -> None:
        self.events.labels(event.model, str(event.kind)).inc()
        if event.kind in TIMED and event.duration_usec:
            self.durations.labels(event.model, str(event.kind)).observe(event.duration_usec / 1e6)
        if self.textfile:
            self.write_textfile()

    def render(self) -> str:
        """The text exposition format (what the textfile holds and a scraper gets by default)."""
        return prometheus_client.generate_latest(self.registry).decode()

    def write_textfile(self) -> None:
        """Replace the textfile atomically. The temporary file is created beside it by mkstemp (an unpredictable
        name, O_EXCL, so no symlink or file planted in the directory is followed or reused), made 0644 (the
        daemon's umask is 077; node_exporter reads it as another user), synced, then renamed over the target.
        prometheus_client's write_to_textfile is not used: its temporary name is predictable."""
        directory, base = os.path.split(os.path.abspath(self.textfile))
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
        except OSError as e:
            log.warning("cannot write metrics to %s: %s", self.textfile, e)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(prometheus_client.generate_latest(self.registry))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.textfile)
        except OSError as e:
            log.warning("cannot write metrics to %s: %s", self.textfile, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    async def serve(self, listen: str) -> WSGIServer:
        """prometheus_client's HTTP server on HOST:PORT, in its own thread; scrapes read the engine on this loop."""
        host, _, port = listen.rpartition(":")
        self.state.loop = asyncio.get_running_loop()
        server, _ = prometheus_client.start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        return server
