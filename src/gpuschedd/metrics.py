"""Prometheus text exposition of what gpuschedd manages: per model state, VRAM, snapshot bytes, freeze/thaw
counts and duration histograms; per GPU memory; host RAM parked in frozen models.

Off by default. `MetricsListen=127.0.0.1:9835` serves it over HTTP (GET /metrics; no TLS, no auth, so bind it
where only the scraper reaches; the shipped unit has no network, see docs/configuration.md for the drop-in),
`MetricsTextfile=PATH` writes it atomically after every event for node_exporter's textfile collector."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter

from .engine import Engine, EngineListener
from .events import Event, EventKind
from .model import State

log = logging.getLogger(__name__)

# Seconds: from sub-second freezes of small models to the ~10 s of a 7B model on the driver path.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TIMED = (EventKind.FREEZE, EventKind.THAW)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1


class Metrics(EngineListener):
    """Counts events as the engine emits them; renders the rest from the engine's live state."""

    def __init__(self, engine: Engine, textfile: str = "") -> None:
        self.engine = engine
        self.textfile = textfile
        self.events: Counter[tuple[str, str]] = Counter()  # (model, kind) → count
        self.durations: dict[tuple[str, str], Histogram] = {}

    def event(self, event: Event) -> None:
        self.events[(event.model, str(event.kind))] += 1
        if event.kind in TIMED and event.duration_usec:
            key = (event.model, str(event.kind))
            self.durations.setdefault(key, Histogram()).observe(event.duration_usec / 1e6)
        if self.textfile:
            self.write_textfile()

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        models = list(self.engine.models.values())
        family("gpusched_model_state", "gauge", "1 for the state the model is in")
        for m in models:
            for state in State:
                out.append(f'gpusched_model_state{{model="{_label(m.name)}",state="{state}"}} {int(m.state == state)}')
        family("gpusched_model_vram_bytes", "gauge", "GPU memory the model's processes hold")
        out += [f'gpusched_model_vram_bytes{{model="{_label(m.name)}"}} {m.vram_bytes}' for m in models]
        family("gpusched_model_snapshot_bytes", "gauge", "host RAM the frozen model's GPU state takes")
        out += [f'gpusched_model_snapshot_bytes{{model="{_label(m.name)}"}} {m.snapshot_bytes}' for m in models]
        family("gpusched_events_total", "counter", "events per model and kind (run, freeze, thaw, refusal, ...)")
        for (model, kind), n in sorted(self.events.items()):
            out.append(f'gpusched_events_total{{model="{_label(model)}",event="{kind}"}} {n}')
        family("gpusched_transition_seconds", "histogram", "how long freezes and thaws took")
        for (model, kind), h in sorted(self.durations.items()):
            labels = f'model="{_label(model)}",event="{kind}"'
            for bound, count in zip(BUCKETS, h.counts, strict=True):
                out.append(f'gpusched_transition_seconds_bucket{{{labels},le="{bound}"}} {count}')
            out.append(f'gpusched_transition_seconds_bucket{{{labels},le="+Inf"}} {h.total}')
            out.append(f"gpusched_transition_seconds_sum{{{labels}}} {h.sum:.6f}")
            out.append(f"gpusched_transition_seconds_count{{{labels}}} {h.total}")
        gpus = self.engine.telemetry.gpus()
        for metric, attr, text in (
            ("gpusched_gpu_memory_total_bytes", "total_bytes", "GPU memory in all"),
            ("gpusched_gpu_memory_used_bytes", "used_bytes", "GPU memory in use"),
            ("gpusched_gpu_memory_free_bytes", "free_bytes", "GPU memory free"),
        ):
            family(metric, "gauge", text)
            out += [f'{metric}{{gpu="{g.uuid}",index="{g.index}"}} {getattr(g, attr)}' for g in gpus]
        family("gpusched_ram_frozen_bytes", "gauge", "host RAM parked in frozen models")
        out.append(f"gpusched_ram_frozen_bytes {self.engine.ram_frozen_bytes()}")
        family("gpusched_ram_budget_bytes", "gauge", "RamBudget=")
        out.append(f"gpusched_ram_budget_bytes {self.engine.config.ram_budget_bytes}")
        return "\n".join(out) + "\n"

    def write_textfile(self) -> None:
        tmp = f"{self.textfile}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(self.render())
            os.chmod(tmp, 0o644)  # the daemon's umask is 077; node_exporter reads it as another user
            os.replace(tmp, self.textfile)
        except OSError as e:
            log.warning("cannot write metrics to %s: %s", self.textfile, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    async def serve(self, listen: str) -> asyncio.Server:
        """HTTP/1.0 on HOST:PORT, GET /metrics only."""
        host, _, port = listen.rpartition(":")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = await asyncio.wait_for(reader.readline(), timeout=5)
                method, path, *_ = [*request.decode(errors="replace").split(), "", ""]
                if method == "GET" and path.split("?")[0] == "/metrics":
                    body, status = self.render().encode(), "200 OK"
                    kind = "text/plain; version=0.0.4; charset=utf-8"
                else:
                    body, status, kind = b"not found\n", "404 Not Found", "text/plain"
                writer.write(
                    f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                )
                await writer.drain()
            except (TimeoutError, ConnectionError, UnicodeError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(handle, host.strip("[]") or "127.0.0.1", int(port))
