"""The Prometheus endpoint: /metrics in the standard text exposition.

Served by prometheus_client's own HTTP server thread.  Scrapes read the
latest immutable snapshot that the daemon publishes, so a scrape never
touches daemon state that the trio thread is changing.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mithrilfs.errors import UserError
from mithrilfs.stats import COUNTERS, GAUGES, Snapshot

PREFIX = "mithrilfs_"
# Per-tree usage (stats.tree_usage), refreshed by the daemon at a slow pace.
TREE_GAUGES = (
    ("tree_logical_bytes", "Bytes of the files in each tree, before dedup"),
    ("tree_files", "Files in each tree"),
)


class SnapshotCollector(Collector):
    def __init__(self, device_class: str) -> None:
        self.device_class = device_class
        self.snapshot = Snapshot([], {})

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot  # one read: the daemon replaces it whole
        families: dict[str, CounterMetricFamily] = {}
        for name, (help_text, label_names) in COUNTERS.items():
            # prometheus_client appends _total to counters itself.
            families[name] = CounterMetricFamily(
                PREFIX + name.removesuffix("_total"),
                help_text,
                labels=[*label_names, "device_class"],
            )
        for name, labels, value in snapshot.counters:
            family = families.get(name)
            if family is None:
                continue
            _help, label_names = COUNTERS[name]
            family.add_metric(
                [*(labels.get(label, "") for label in label_names), labels["device_class"]],
                value,
            )
        yield from families.values()
        for name, help_text in GAUGES.items():
            gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=["device_class"])
            gauge.add_metric([self.device_class], snapshot.gauges.get(name, 0))
            yield gauge
        for column, (name, help_text) in enumerate(TREE_GAUGES):
            gauge = GaugeMetricFamily(PREFIX + name, help_text, labels=["tree", "device_class"])
            for tree, usage in sorted(snapshot.tree_usage.items()):
                gauge.add_metric([tree, self.device_class], usage[column])
            yield gauge


def parse_listen(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--metrics-listen expects HOST:PORT, got '{address}'", 2)
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(address: str, collector: SnapshotCollector) -> None:
    host, port = parse_listen(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UserError(f"cannot serve metrics on {address}: {exc.strerror}", 1) from None
