"""Per-peer counts of closed connections between two drains (the tracker's rows, mutable), and
a drain's activity as a plain table (tests, benchmarks)."""

from __future__ import annotations

from dataclasses import replace

from tcpwatch.model import (
    DIRECTIONS,
    OUTCOMES,
    LifecycleStats,
    PeerActivity,
    PeerStats,
    add_peer_stats,
)
from tcpwatch.scores import FAILURE_WEIGHT
from tcpwatch.sources.lifecycle_events import ABORTED, OUTBOUND, RTT_BOUNDS_US
from tcpwatch.stalls import ClosedWaits


class PeerCounts:
    """Mutable counts of one tracked (direction, peer) since the previous drain, and its score;
    frozen into PeerStats (the delta) by each drain that finds it changed."""

    __slots__ = (
        "busy_us",
        "bytes_acked",
        "bytes_received",
        "closed",
        "last_seen",
        "listed",
        "retrans",
        "rtt",
        "rtt_count",
        "rtt_sum_us",
        "rwnd_us",
        "score",
        "scored_at",
        "segs_out",
        "sndbuf_us",
        "zero_window",
    )

    def __init__(self, now: float, direction: int = OUTBOUND, peer: str = "") -> None:
        self.score = 0.0  # as of scored_at; halves every half-life after it
        self.scored_at = now
        self.last_seen = now
        # What a drain lists while nothing closes: made when the score changes, not per drain
        self.listed = PeerActivity(DIRECTIONS[direction], peer, 0.0, None)
        self.reset()

    def decayed(self, now: float, half_life: float) -> float:
        """The score at ``now``."""
        factor: float = 0.5 ** (max(now - self.scored_at, 0.0) / half_life)
        return self.score * factor

    def reset(self) -> None:
        self.closed = [0] * len(OUTCOMES)
        self.rtt = [0] * (len(RTT_BOUNDS_US) + 1)
        self.rtt_count = 0
        self.rtt_sum_us = 0
        self.segs_out = 0
        self.retrans = 0
        self.bytes_acked = 0
        self.bytes_received = 0
        self.busy_us = 0
        self.rwnd_us = 0
        self.sndbuf_us = 0
        self.zero_window = 0

    def pending(self) -> int:
        """Connections closed since the previous drain."""
        return sum(self.closed)

    def weight(self) -> int:
        """What the closes since the previous drain add to the score: a failed connection
        (timeout, refused, aborted: OUTCOMES after "ok") counts FAILURE_WEIGHT closes, so a
        destination that fails now and then keeps its row beside busy healthy ones and C01 can
        judge it by name rather than under peer "other"."""
        return self.closed[0] + FAILURE_WEIGHT * (sum(self.closed) - self.closed[0])

    def absorb(self, other: PeerCounts) -> None:
        """Add ``other``'s pending counts to this one's (a peer no longer tracked goes to
        PEER_OTHER's)."""
        self.closed = [a + b for a, b in zip(self.closed, other.closed, strict=True)]
        self.rtt = [a + b for a, b in zip(self.rtt, other.rtt, strict=True)]
        self.rtt_count += other.rtt_count
        self.rtt_sum_us += other.rtt_sum_us
        self.segs_out += other.segs_out
        self.retrans += other.retrans
        self.bytes_acked += other.bytes_acked
        self.bytes_received += other.bytes_received
        self.busy_us += other.busy_us
        self.rwnd_us += other.rwnd_us
        self.sndbuf_us += other.sndbuf_us
        self.zero_window += other.zero_window

    def frozen(self, direction: int, peer: str) -> PeerStats:
        return PeerStats(
            direction=DIRECTIONS[direction],
            peer=peer,
            closed=dict(zip(OUTCOMES, self.closed, strict=True)),
            rtt_buckets=tuple(self.rtt),
            rtt_count=self.rtt_count,
            rtt_sum_seconds=self.rtt_sum_us / 1e6,
            segments_sent=self.segs_out,
            segments_retransmitted=self.retrans,
            bytes_sent=self.bytes_acked,
            bytes_received=self.bytes_received,
            waits=ClosedWaits(self.busy_us, self.rwnd_us, self.sndbuf_us, self.zero_window),
        )


def bare_closes(address: str, count: int) -> PeerStats:
    """``count`` failed connects whose port the kernel cleared, as the bare address's closes."""
    closes = PeerCounts(0.0)
    closes.closed[ABORTED] = count
    return closes.frozen(OUTBOUND, address)


def table_of(stats: LifecycleStats) -> LifecycleStats:
    """A drain's activity as a plain table, every tracked peer its own row (no budget), failed
    connects whose port was cleared under their bare address (no join): for a single drain since
    the start (tests, benchmarks) these are the cumulative counts."""
    if stats.activity is None:
        return stats
    merged: dict[tuple[str, str], PeerStats] = {}
    deltas = [a.delta for a in stats.activity if a.delta is not None]
    for delta in (*deltas, *(bare_closes(c.address, c.count) for c in stats.cleared)):
        key = (delta.direction, delta.peer)
        merged[key] = add_peer_stats(merged.get(key), delta)
    rows = sorted(merged.values(), key=lambda row: (row.direction, row.peer))
    return replace(stats, peers=tuple(rows), activity=None, cleared=())
