"""What renderers read: the pipeline's latest state, replaced whole after each poll."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from tcpwatch.model import Snapshot
from tcpwatch.rules import Finding
from tcpwatch.sources.registry import host_source_names, source_names

POLL_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True, slots=True)
class PollHistogram:
    """Poll durations so far, as cumulative-free bucket counts (bucket i: <= POLL_BUCKETS[i])."""

    counts: tuple[int, ...] = (0,) * (len(POLL_BUCKETS) + 1)  # last slot: +Inf
    total: float = 0.0

    def observe(self, seconds: float) -> PollHistogram:
        counts = list(self.counts)
        counts[bisect.bisect_left(POLL_BUCKETS, seconds)] += 1
        return PollHistogram(tuple(counts), self.total + seconds)


@dataclass(frozen=True, slots=True)
class Trend:
    """One namespace over the last polls, for the live views (tcpwatch/trends.py builds it)."""

    times: tuple[float, ...] = ()  # unix time of each poll kept, oldest first
    totals: tuple[tuple[int, ...], ...] = ()  # per poll kept: sockets per state, STATES order
    rates: Mapping[str, float] = field(default_factory=dict)  # counter -> per second, last poll


@dataclass(frozen=True, slots=True)
class ExportState:
    """Everything one scrape renders. Replaced whole after each poll, never mutated."""

    snapshots: tuple[Snapshot, ...]
    findings: tuple[Finding, ...]
    last_poll: float
    poll_durations: PollHistogram = field(default_factory=PollHistogram)
    source_errors: Mapping[tuple[str, str], int] = field(default_factory=dict)
    top_processes: int = 20
    top_destinations: int = 20
    live_peers: int = 30  # host-wide rows of the live per-peer gauges (collect.live_peers)
    cached: bool = False
    # Every source tcpwatch_source_errors_total counts (0 until one fails), in poll order.
    source_names: tuple[str, ...] = field(default_factory=source_names)
    # Of them, those read once for every namespace (processes, owners, sysctl_files).
    host_sources: frozenset[str] = field(default_factory=host_source_names)
    trends: Mapping[str, Trend] = field(default_factory=dict)  # netns -> its recent polls
    interval: float = 0.0  # seconds between polls (0: one-shot); the live page refreshes so often
    # Seconds the rules judged: from the start of their window to this poll (the longest of the
    # namespaces'); 0 without a window (the first poll, `check --window 0`).
    window: float = 0.0
