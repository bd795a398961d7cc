"""Families of what the pipeline keeps itself: the active findings, each source's health in the
latest poll and since start, and how long polls take."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tcpwatch.render.families.base import HOST, PIPELINE, family, gauge, host_snapshot
from tcpwatch.state import POLL_BUCKETS, ExportState

SOURCE_LABELS = ["netns", "source"]


@family(source=PIPELINE, order=90)
def finding_family(state: ExportState) -> Iterator[Metric]:
    findings = gauge(
        "tcpwatch_finding",
        "1 for each active finding; id and slug name the rule (docs/rules/<id>-<slug>.md), "
        "subject the listener, process (by name, never pid) or destination it is about (empty "
        "when host-wide).",
        ["netns", "id", "slug", "severity", "subject"],
        state,
    )
    seen: set[tuple[str, ...]] = set()
    for finding in state.findings:
        labels = (finding.netns, finding.rule_id, finding.slug, finding.severity, finding.subject)
        if labels not in seen:
            seen.add(labels)
            findings.add_metric(list(labels), 1)
    yield findings


@family(source=PIPELINE, order=100)
def poll_families(state: ExportState) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "tcpwatch_source_up",
        "1 if the source worked in the latest poll, 0 if it failed (its metrics are then absent).",
        labels=SOURCE_LABELS,
    )
    duration = GaugeMetricFamily(
        "tcpwatch_source_duration_seconds",
        "How long the source took in the latest poll.",
        labels=SOURCE_LABELS,
    )
    degraded = GaugeMetricFamily(
        "tcpwatch_source_degraded",
        "Fields the source left out in the latest poll because they were malformed or "
        "unreadable (one per sysctl file); the source is still up. 0 when it read everything.",
        labels=SOURCE_LABELS,
    )
    errors = CounterMetricFamily(
        "tcpwatch_source_errors",
        "Polls in which the source failed, since tcpwatch started.",
        labels=SOURCE_LABELS,
    )
    # A host-wide source is read once for every namespace: beside the host's namespace, its
    # health is reported there only.
    host = host_snapshot(state)
    on_host = {status.name for status in host.sources} if host else set()
    shared = state.host_sources & on_host
    for snap in state.snapshots:
        own = shared if snap.netns != HOST else frozenset()
        for status in snap.sources:
            if status.name in own:
                continue
            up.add_metric([snap.netns, status.name], 1 if status.ok else 0)
            duration.add_metric([snap.netns, status.name], status.duration_seconds)
            degraded.add_metric([snap.netns, status.name], len(status.skipped))
        for source in state.source_names:
            if source in own:
                continue
            failures = state.source_errors.get((snap.netns, source), 0)
            errors.add_metric([snap.netns, source], failures)
    last = GaugeMetricFamily(
        "tcpwatch_last_poll_timestamp_seconds",
        "Unix time at which the latest poll started.",
    )
    last.add_metric([], state.last_poll)
    histogram = HistogramMetricFamily(
        "tcpwatch_poll_duration_seconds", "How long whole polls took (all sources, all namespaces)."
    )
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    bounds = (*POLL_BUCKETS, float("inf"))
    for bound, count in zip(bounds, state.poll_durations.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    histogram.add_metric([], buckets, state.poll_durations.total)
    yield from (up, degraded, duration, errors, last, histogram)
