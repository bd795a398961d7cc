"""What the lifecycle source heard: closed connections on the socket-destroy multicast (the
snapshot's ``connections``), built by tcpwatch/sources/lifecycle*.py; meanings in
docs/connections.md."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tcpwatch.stalls import ClosedWaits
from tcpwatch.tracepoint_stats import ClearedClose

DIRECTIONS: tuple[str, ...] = ("inbound", "outbound")
# ok: handshake completed; timeout: no answer (segs_in 0); refused: answered (RST) before the
# handshake completed; aborted: a connect that never completed and whose port and counters the
# kernel cleared before reporting (a blocking connect() that failed, or a failed connect closed
# with SO_LINGER 0, as proxies do). A connection that worked and was then closed with SO_LINGER 0
# is ok, under the bare address.
OUTCOMES: tuple[str, ...] = ("ok", "timeout", "refused", "aborted")
# Upper bounds of the RTT histogram, in 1-3 steps (10^k and 3 x 10^k s): loopback and veth
# (under 30 us) to intercontinental (1 s); 11 bounds, 14 series with +Inf, sum and count. Chosen
# by measurement (docs/metrics.md, "Latency buckets"): a duration histogram elsewhere extends the
# same steps upwards (3, 10, 30 s) rather than inventing its own.
RTT_BUCKETS_SECONDS: tuple[float, ...] = (
    0.00001,
    0.00003,
    0.0001,
    0.0003,
    0.001,
    0.003,
    0.01,
    0.03,
    0.1,
    0.3,
    1.0,
)
PEER_OTHER = "other"  # every peer beyond the table's limit, per direction


@dataclass(frozen=True, slots=True)
class PeerStats:
    """Cumulative counts for the connections of one (direction, peer) that closed so far."""

    direction: str  # one of DIRECTIONS
    peer: str  # "10.0.0.5:5432", "[::1]:8080", a bare address (port cleared), or PEER_OTHER
    closed: Mapping[str, int]  # outcome -> connections closed (every OUTCOMES key present)
    # Smoothed RTT at close of the connections with an RTT sample: per bucket of
    # RTT_BUCKETS_SECONDS, then one more for above the last bound (not cumulative).
    rtt_buckets: tuple[int, ...]
    rtt_count: int
    rtt_sum_seconds: float
    segments_sent: int  # tcpi_segs_out
    segments_retransmitted: int  # tcpi_total_retrans
    bytes_sent: int  # tcpi_bytes_acked: bytes the peer acknowledged (SYN and FIN count one each)
    bytes_received: int  # tcpi_bytes_received (a received FIN counts one)
    waits: ClosedWaits = field(default_factory=ClosedWaits)  # busy, limited, zero windows

    def rtt_cumulative(self) -> tuple[int, ...]:
        """Counts per upper bound, cumulative, the last one being +Inf (Prometheus' shape)."""
        total = 0
        cumulative: list[int] = []
        for count in self.rtt_buckets:
            total += count
            cumulative.append(total)
        return tuple(cumulative)


def add_peer_stats(total: PeerStats | None, delta: PeerStats, peer: str | None = None) -> PeerStats:
    """``total`` + ``delta`` (counts of the same row; ``peer`` renames the result)."""
    name = peer if peer is not None else delta.peer
    if total is None:
        return delta if name == delta.peer else replace(delta, peer=name)
    return PeerStats(
        direction=total.direction,
        peer=name,
        closed={o: total.closed.get(o, 0) + delta.closed.get(o, 0) for o in OUTCOMES},
        rtt_buckets=tuple(a + b for a, b in zip(total.rtt_buckets, delta.rtt_buckets, strict=True)),
        rtt_count=total.rtt_count + delta.rtt_count,
        rtt_sum_seconds=total.rtt_sum_seconds + delta.rtt_sum_seconds,
        segments_sent=total.segments_sent + delta.segments_sent,
        segments_retransmitted=total.segments_retransmitted + delta.segments_retransmitted,
        bytes_sent=total.bytes_sent + delta.bytes_sent,
        bytes_received=total.bytes_received + delta.bytes_received,
        waits=total.waits + delta.waits,
    )


@dataclass(frozen=True, slots=True)
class PeerActivity:
    """One tracked (direction, peer) of a namespace's destroy listener since the previous drain:
    what closed (``delta``, None: nothing) and its ``score`` at its last close (the listener keeps
    the busiest; peer_budget.py scores anew). PEER_OTHER: closes of pairs no longer tracked."""

    direction: str
    peer: str
    score: float
    delta: PeerStats | None


@dataclass(frozen=True, slots=True)
class LifecycleStats:
    """Everything one namespace's destroy listener aggregated since it started (cumulative).

    As the source drains it, ``activity`` holds what closed since the previous drain and
    ``peers`` is empty; the pipeline's host-wide budget (peer_budget.py) then fills ``peers``
    with the rows it gave this namespace, ``held`` with rows it keeps but does not export this
    poll, ``folded`` with the closes counted under PEER_OTHER or under no row, and sets
    ``activity`` to None."""

    peers: tuple[PeerStats, ...]  # sorted by direction, then peer; PEER_OTHER rows included
    events: int  # destroy messages received and parsed (every outcome, ignored ones too)
    ignored: int  # of them, sockets that never had a peer (closed listeners, never connected)
    malformed: int  # datagrams that could not be parsed (their remaining messages are skipped)
    # recv() failures with ENOBUFS: the kernel dropped one or more messages since the last read.
    overruns: int
    # Messages the kernel dropped at this socket for a full receive buffer (sk_drops, read with
    # SO_MEMINFO): exact. None when the kernel does not report it (before 4.12).
    lost: int | None
    max_peers: int  # the host-wide row budget (collect.connection_peers), PEER_OTHER included
    evicted: int  # rows this namespace gave up, to a busier peer or after being idle
    receive_buffer: int  # bytes the kernel granted the socket (SO_RCVBUF as read back)
    activity: tuple[PeerActivity, ...] | None = None
    # Rows remembered but not exported this poll: a row that comes back goes on from these.
    held: tuple[PeerStats, ...] = ()
    # direction -> closes not counted under their own peer's row (under PEER_OTHER, or under no
    # row when even PEER_OTHER did not fit the budget); cumulative; every direction once budgeted.
    folded: Mapping[str, int] = field(default_factory=dict)
    cleared: tuple[ClearedClose, ...] = ()  # as drained: failed connects the kernel cleared
    unjoined: int = 0  # once budgeted: of those, found by no tracepoint record (peer_join.py)
