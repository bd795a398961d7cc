"""What the tracepoints source counts per namespace between two drains.

Each namespace has three tables: connects per (destination, process), resets per (direction,
peer, reason), drops per (reason, listener), and the failed connects of the drain with their
local port (for the pipeline's join with the destroy events, tcpwatch/peer_join.py). Each drain
freezes them into TracepointStats (``pending``: counts since the previous drain) and starts
afresh; which keys get rows of their own is the pipeline's host-wide budget's decision
(tcpwatch/peer_budget.py), over these and the connection metrics' rows together.

A table holds at most ``PENDING_LIMIT`` keys between two drains: past it (a flood of new keys),
events are counted under the table's ``"other"`` key at once, and in ``folded``.
"""

from __future__ import annotations

from tcpwatch.model import PEER_OTHER
from tcpwatch.sources.lifecycle_events import Context, make_context
from tcpwatch.tracepoint_stats import (
    CONNECT_BUCKETS_SECONDS,
    TABLES,
    ConnectStats,
    DropStats,
    FailedConnect,
    ResetStats,
    TracepointHost,
    TracepointStats,
)

BOUNDS_NS = tuple(round(bound * 1e9) for bound in CONNECT_BUCKETS_SECONDS)
PENDING_LIMIT = 4096  # keys per table and namespace between two drains; the rest fold
FAILED_LIMIT = 8192  # failed connects per namespace between two drains, for the join


class Connects:
    """Connects of one (destination, process): the histogram, failures, retransmissions."""

    __slots__ = ("buckets", "count", "failures", "retransmitted", "sum_ns", "syn_retransmits")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS_NS) + 1)
        self.count = 0
        self.sum_ns = 0
        self.failures: dict[str, int] = {}
        self.syn_retransmits = 0
        self.retransmitted = 0

    def frozen(self, destination: str, process: str) -> ConnectStats:
        return ConnectStats(
            destination=destination,
            process=process,
            buckets=tuple(self.buckets),
            count=self.count,
            sum_seconds=self.sum_ns / 1e9,
            failures=dict(sorted(self.failures.items())),
            syn_retransmits=self.syn_retransmits,
            retransmitted=self.retransmitted,
        )


Key = tuple[str, ...]


def _other_key(table: str, key: Key) -> Key:
    if table == "connects":
        return (PEER_OTHER, PEER_OTHER)
    if table == "resets":
        return (key[0], PEER_OTHER, key[2])  # direction and reason kept: both are bounded
    return (key[0], PEER_OTHER)  # drops: the reason kept


class Tally:
    """One namespace's tables since the previous drain (the hot path adds to them)."""

    __slots__ = ("connects", "context", "drops", "failed", "folded", "resets")

    def __init__(self) -> None:
        self.connects: dict[Key, Connects] = {}
        self.resets: dict[Key, int] = {}
        self.drops: dict[Key, int] = {}
        self.failed: list[FailedConnect] = []
        self.folded: dict[str, int] = dict.fromkeys(TABLES, 0)
        self.context: Context = make_context((), None)

    def connect_row(self, destination: str, process: str) -> Connects:
        key: Key = (destination, process)
        row = self.connects.get(key)
        if row is None:
            if len(self.connects) >= PENDING_LIMIT:  # a flood of new keys: they fold at once
                key = _other_key("connects", key)
                self.folded["connects"] += 1
                row = self.connects.get(key)
            if row is None:
                row = self.connects[key] = Connects()
        return row

    def failed_connect(self, failed: FailedConnect) -> None:
        if len(self.failed) < FAILED_LIMIT:  # past it: no join, the close keeps no port
            self.failed.append(failed)

    def reset(self, direction: str, peer: str, reason: str) -> None:
        self._count(self.resets, "resets", (direction, peer, reason))

    def drop(self, reason: str, listener: str) -> None:
        self._count(self.drops, "drops", (reason, listener))

    def _count(self, table: dict[Key, int], name: str, key: Key) -> None:
        if key not in table and len(table) >= PENDING_LIMIT:
            key = _other_key(name, key)
            self.folded[name] += 1
        table[key] = table.get(key, 0) + 1

    def drained(self, host: TracepointHost) -> TracepointStats:
        """What was counted since the previous drain, sorted; the tables start afresh."""
        stats = TracepointStats(
            connects=tuple(
                row.frozen(key[0], key[1]) for key, row in sorted(self.connects.items())
            ),
            resets=tuple(
                ResetStats(key[0], key[1], key[2], count)
                for key, count in sorted(self.resets.items())
            ),
            drops=tuple(
                DropStats(key[0], key[1], count) for key, count in sorted(self.drops.items())
            ),
            host=host,
            folded=dict(self.folded),
            pending=True,
            failed=tuple(self.failed),
        )
        self.connects, self.resets, self.drops, self.failed = {}, {}, {}, []
        self.folded = dict.fromkeys(TABLES, 0)
        return stats


def empty(host: TracepointHost) -> TracepointStats:
    """The drain of a namespace nothing was counted in."""
    return Tally().drained(host)
