"""The series arithmetic docs/metrics.md states, held to what the exposition renders.

Per row of the connection metrics: SERIES_PER_ROW (outbound) and SERIES_PER_INBOUND_ROW, and the
default row budget that keeps rows x series per row within PEER_SERIES_TARGET. A counter added to
every row fails here until ROW_COUNTERS says so, and then the default budget must shrink.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from tcpwatch.config import CollectSettings
from tcpwatch.model import Snapshot
from tcpwatch.peer_budget import (
    PEER_SERIES_TARGET,
    SERIES_PER_INBOUND_ROW,
    SERIES_PER_ROW,
)
from tcpwatch.render.prometheus import render
from tcpwatch.sources.lifecycle_peers import DEFAULT_MAX_PEERS
from tcpwatch.state import ExportState
from tests.unit.snapshots import lifecycle, peer_stats, snapshot

PEER_LABELS = {"direction", "peer"}


def series(snapshots: Iterable[Snapshot]) -> list[tuple[str, frozenset[tuple[str, str]]]]:
    """Every sample of the exposition (tcpwatch's own families), as (name, labels)."""
    text = render(ExportState(tuple(snapshots), (), 1.7e9), include_process=False).decode()
    return [
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def per_row(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]]) -> Counter[str]:
    """Series per peer row, keyed by its peer label."""
    return Counter(
        dict(labels)["peer"] for _, labels in samples if dict(labels).keys() >= PEER_LABELS
    )


def test_a_row_costs_what_the_budget_counts() -> None:
    rows = [
        peer_stats("10.0.0.5:5432", "outbound", ok=5, timeout=1, rtt_seconds=(0.002,)),
        peer_stats("10.0.0.6:443", "outbound", ok=3),  # no failure: the same series, zeros
        peer_stats("0.0.0.0:80", "inbound", ok=9, aborted=1, rtt_seconds=(0.0001,)),
    ]
    counts = per_row(series([snapshot(connections=lifecycle(rows))]))
    assert counts == {
        "10.0.0.5:5432": SERIES_PER_ROW,
        "10.0.0.6:443": SERIES_PER_ROW,
        "0.0.0.0:80": SERIES_PER_INBOUND_ROW,
    }
    assert SERIES_PER_ROW == 26


def test_an_inbound_row_shows_a_rare_outcome_once_it_happened() -> None:
    row = peer_stats("0.0.0.0:443", "inbound", ok=2, refused=1)  # a Fast Open child, say
    samples = series([snapshot(connections=lifecycle([row]))])
    outcomes = {
        dict(labels)["outcome"]
        for name, labels in samples
        if name == "tcpwatch_connections_closed_total"
    }
    assert outcomes == {"ok", "refused", "aborted"}
    assert per_row(samples)["0.0.0.0:443"] == SERIES_PER_INBOUND_ROW + 1


def test_the_default_row_budget_fills_the_series_target() -> None:
    rows = CollectSettings().connection_peers
    assert rows == DEFAULT_MAX_PEERS
    assert rows * SERIES_PER_ROW <= PEER_SERIES_TARGET < (rows + 1) * SERIES_PER_ROW


def names_of(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]], netns: str) -> Counter[str]:
    return Counter(name for name, labels in samples if ("netns", netns) in labels)


def sysctls_of(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]], netns: str) -> set[str]:
    return {
        dict(labels)["name"]
        for name, labels in samples
        if name == "tcpwatch_sysctl" and ("netns", netns) in labels
    }


def test_a_namespace_beside_the_host_leaves_out_what_the_host_says() -> None:
    host = snapshot(netns="host", sysctl_overrides={"net.core.somaxconn": (4096,)})
    pod = snapshot(netns="pod:shop/web-1", sysctl_overrides={"net.core.somaxconn": (128,)})
    together = series([host, pod])
    assert sysctls_of(together, "pod:shop/web-1") == {"net.core.somaxconn"}
    assert len(sysctls_of(together, "host")) > 10
    pods = names_of(together, "pod:shop/web-1")
    assert "tcpwatch_orphan_sockets" not in pods and "tcpwatch_tcp_memory_bytes" not in pods
    host_wide = {
        dict(labels)["source"]
        for name, labels in together
        if name == "tcpwatch_source_up" and ("netns", "pod:shop/web-1") in labels
    }
    assert host_wide == {"sysctl", "sockstat", "counters", "sockdiag"}  # not "processes"
    on_host = names_of(together, "host")
    assert on_host["tcpwatch_orphan_sockets"] == 1 and on_host["tcpwatch_source_up"] == 5


def test_without_the_host_every_namespace_has_everything() -> None:
    pod = snapshot(netns="pod:shop/web-1", sysctl_overrides={"net.core.somaxconn": (128,)})
    other = snapshot(netns="pod:shop/web-2")
    alone = series([pod, other])
    both = series([snapshot(netns="host"), pod])
    assert sysctls_of(alone, "pod:shop/web-1") == sysctls_of(both, "host")
    for netns in ("pod:shop/web-1", "pod:shop/web-2"):
        names = names_of(alone, netns)
        assert names["tcpwatch_orphan_sockets"] == 1 and names["tcpwatch_source_up"] == 5
