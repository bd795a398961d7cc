"""The lifecycle source's health counters: each LifecycleStats field under its own name."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client.core import Metric

from tcpwatch.render.families.lifecycle import closed_connection_families
from tcpwatch.state import ExportState
from tests.unit.snapshots import lifecycle, peer_stats, snapshot


def by_name(metrics: list[Metric]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for metric in metrics:
        for sample in metric.samples:
            values.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return values


def test_each_counted_health_field_is_its_own_counter_per_namespace() -> None:
    heard = replace(
        lifecycle([peer_stats("10.0.0.9:5432", ok=5)], events=16),
        ignored=11,
        malformed=2,
        overruns=3,
        lost=7,
        evicted=4,
    )
    state = ExportState(
        snapshots=(
            snapshot(netns="blue", connections=heard),
            snapshot(netns="green", connections=lifecycle()),
            snapshot(netns="red", connections=None),  # the source failed or was not started
        ),
        findings=(),
        last_poll=0.0,
    )
    metrics = list(closed_connection_families.render(state))
    assert all(metric.type == "counter" for metric in metrics if "lifecycle" in metric.name)
    values = by_name(metrics)
    blue, green = (("netns", "blue"),), (("netns", "green"),)
    expected = {
        "tcpwatch_lifecycle_events_total": 16,
        "tcpwatch_lifecycle_events_lost_total": 7,
        "tcpwatch_lifecycle_overruns_total": 3,
        "tcpwatch_lifecycle_events_ignored_total": 11,
        "tcpwatch_lifecycle_datagrams_malformed_total": 2,
        "tcpwatch_lifecycle_peers_evicted_total": 4,
    }
    for name, value in expected.items():
        assert values[name] == {blue: value, green: 0.0}, name
