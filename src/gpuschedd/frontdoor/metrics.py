"""The front door's Prometheus metrics, served on its own /metrics: requests and waits per model, the time of each
swap, thaw, start and freeze it asked of gpuschedd, and answers by HTTP status. A registry per instance (tests run
several); the daemon's own metrics (gpuschedd.metrics) stay the daemon's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a running model (no wait) over agent and driver thaws to cold starts of large models.
BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gpusched_frontdoor_requests", "Requests routed to a catalog model", ["model"], registry=r
        )
        self.responses = Counter(
            "gpusched_frontdoor_responses", "Answers by HTTP status (the front door's and the models')", ["code"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("gpusched_frontdoor_in_flight", "Requests being served, by model", ["model"], registry=r)
        self.waiting = Gauge("gpusched_frontdoor_waiting", "Requests waiting for their model to be ready", registry=r)
        self.wait_seconds = Histogram(
            "gpusched_frontdoor_wait_seconds",
            "How long a request whose model had none in flight waited for it to be ready",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )
        self.swap_seconds = Histogram(
            "gpusched_frontdoor_swap_seconds",
            "Duration of the front door's calls to gpuschedd: swap, thaw, start (until the port accepts), freeze",
            ["action"],
            buckets=BUCKETS,
            registry=r,
        )
