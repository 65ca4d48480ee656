"""Prometheus metrics from the installed daemon: the textfile and the HTTP endpoint, switched on the way an admin
would (gpuschedd.conf, and a drop-in opening AF_INET for the endpoint), then switched off again."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sysutil import Models, name_has_owner, run, wait_until

CONF = Path("/etc/gpusched/gpuschedd.conf")
DROPIN = Path("/etc/systemd/system/gpuschedd.service.d/50-metrics-test.conf")
TEXTFILE = Path("/run/gpuschedd/metrics.prom")  # RuntimeDirectory=: writable under ProtectSystem=strict
LISTEN = "127.0.0.1:9835"


def restart_daemon() -> None:
    run("systemctl", "daemon-reload")
    run("systemctl", "restart", "gpuschedd.service")
    wait_until("org.gpusched1 to have an owner", name_has_owner)


@pytest.fixture
def metrics_on() -> Iterator[None]:
    shipped = CONF.read_text()
    # [Daemon] is the shipped file's last section: keys appended land in it
    CONF.write_text(shipped + f"\nMetricsListen={LISTEN}\nMetricsTextfile={TEXTFILE}\n")
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    # The shipped unit has its own empty network namespace, AF_UNIX sockets only and no IP traffic: an endpoint
    # needs all three opened (docs/configuration.md).
    DROPIN.write_text("[Service]\nPrivateNetwork=no\nRestrictAddressFamilies=AF_INET\nIPAddressAllow=localhost\n")
    restart_daemon()
    yield
    CONF.write_text(shipped)
    DROPIN.unlink()
    restart_daemon()


def value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a text exposition, parsed by prometheus_client's parser."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_textfile_and_endpoint_follow_the_models(metrics_on: None, models: Models) -> None:
    name, _ = models.run("m")
    run("gpusched", "freeze", name)
    assert value(TEXTFILE.read_text(), "gpusched_model_state", model=name, state="frozen") == 1
    assert TEXTFILE.stat().st_mode & 0o777 == 0o644  # node_exporter does not run as root
    with urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=5) as reply:
        body = reply.read().decode()
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert value(body, "gpusched_model_state", model=name, state="frozen") == 1
    assert value(body, "gpusched_events_total", model=name, event="freeze") == 1
    run("gpusched", "thaw", name)
    assert value(TEXTFILE.read_text(), "gpusched_model_state", model=name, state="running") == 1
