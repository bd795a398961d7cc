"""What the kernel's TCP tracepoints said about one namespace: the ``tracepoints`` source's part of
the snapshot (tcpwatch/sources/tracepoints*.py builds it; docs/tracepoints.md says what it means),
and both halves of the join that gives a failed connect's port back to the socket-destroy events
(tcpwatch/peer_join.py).

Not in tcpwatch/readings/ with the other sources' data because the join is here too
(docs/architecture.md); model.py's Snapshot has the field.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

# Connect-time bounds: the RTT histogram's 1-3 steps (10 us .. 1 s: docs/metrics.md, Latency
# buckets), extended upwards as a connect's SYN retransmissions stretch it (1, 3, 7, 15 s with the
# default initial RTO): one retransmission lands in (1 s, 3 s], two or three in (3 s, 10 s].
CONNECT_BUCKETS_SECONDS: tuple[float, ...] = (
    *(0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    *(3.0, 10.0, 30.0),
)
ABANDONED = "abandoned"  # a connect the client closed itself before any answer or error
TABLES = ("connects", "resets", "drops")  # the per-peer tables, as tcpwatch_tracepoint_folded_total


@dataclass(frozen=True, slots=True)
class ConnectStats:
    """Connects of one (destination, process) in one namespace, cumulative since the start."""

    destination: str  # "127.0.0.1:9999", "[2001:db8::5]:443", or PEER_OTHER past the budget
    process: str  # the connecting process' name (/proc/PID/comm), as other sources show it
    # Handshake times (SYN_SENT to ESTABLISHED) per CONNECT_BUCKETS_SECONDS bucket, +Inf last
    buckets: tuple[int, ...]
    count: int
    sum_seconds: float
    failures: Mapping[str, int]  # errno name (ECONNREFUSED, ETIMEDOUT ...) or ABANDONED -> count
    syn_retransmits: int  # SYN retransmissions of these connects, completed or failed
    retransmitted: int  # completed connects that needed at least one SYN retransmission

    def cumulative(self) -> tuple[int, ...]:
        """Counts per upper bound, cumulative, the last one being +Inf (Prometheus' shape)."""
        return tuple(itertools.accumulate(self.buckets))

    def events(self) -> int:
        """Connects counted: completed and failed."""
        return self.count + sum(self.failures.values())

    def plus(self, delta: ConnectStats, destination: str, process: str) -> ConnectStats:
        """This row's counts and ``delta``'s, under the given labels."""
        failures = dict(self.failures)
        for error, count in delta.failures.items():
            failures[error] = failures.get(error, 0) + count
        return ConnectStats(
            destination=destination,
            process=process,
            buckets=tuple(a + b for a, b in zip(self.buckets, delta.buckets, strict=True)),
            count=self.count + delta.count,
            sum_seconds=self.sum_seconds + delta.sum_seconds,
            failures=dict(sorted(failures.items())),
            syn_retransmits=self.syn_retransmits + delta.syn_retransmits,
            retransmitted=self.retransmitted + delta.retransmitted,
        )


@dataclass(frozen=True, slots=True)
class ResetStats:
    """TCP resets of one (direction, peer, reason) in one namespace, cumulative."""

    direction: str  # "sent" / "received"
    peer: str  # the service side: a local port a client reached, or a destination connected to
    reason: str  # the kernel's reason for a sent reset (NO_SOCKET ...); "" for received ones
    count: int


@dataclass(frozen=True, slots=True)
class DropStats:
    """Packets the kernel dropped in one namespace for one reason, at one listener, cumulative."""

    reason: str  # the kernel's drop reason (TCP_LISTEN_OVERFLOW, NETFILTER_DROP ...)
    listener: str  # the listening socket it happened at ("127.0.0.1:8080"), "" for none known
    count: int


@dataclass(frozen=True, slots=True)
class FailedConnect:
    """A connect that failed, as the tracepoints saw it, with what the socket-destroy event of
    an abortive close no longer says (its port and errno): the pipeline joins the two by
    (family, local port, address) (tcpwatch/peer_join.py)."""

    family: int  # AF_INET / AF_INET6
    local_port: int
    address: str  # the destination's address, as lifecycle's bare-address peer writes it
    destination: str  # with its port: "127.0.0.1:9999"
    error: str  # errno name, or ABANDONED


@dataclass(frozen=True, slots=True)
class ClearedClose:
    """Failed connects whose destination port the kernel cleared before their socket-destroy
    event (an abortive close), by what they kept, since the previous drain (the lifecycle
    source's half of the join; counted under the bare address until joined)."""

    family: int  # AF_INET / AF_INET6
    local_port: int  # 0: past the destroy listener's limit, not kept
    address: str  # the destination's address: the bare-address peer
    count: int


@dataclass(frozen=True, slots=True)
class TracepointHost:
    """What the host-wide reader counted: the same value in every namespace's stats."""

    records: Mapping[str, int]  # event -> records read (every namespace's, the host's too)
    lost: int  # records the kernel could not write for a full ring buffer (exact)
    unattributed: Mapping[tuple[str, str], int]  # (event, why) -> records given no namespace
    other_netns: int  # records attributed to namespaces this tcpwatch does not poll
    cpus: int
    buffer_bytes: int  # ring buffer per CPU
    events: tuple[str, ...]  # the tracepoints opened (system:name)
    sockets_followed: int  # sockets whose later records are being attributed by address
    # event -> records the kernel counted (they passed the filter) but neither wrote nor counted
    # lost (tracepoints_delivery.py); empty where the kernel does not count them (before 6.0)
    undelivered: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TracepointStats:
    """One namespace's share of the tracepoint records, cumulative since the reader started."""

    connects: tuple[ConnectStats, ...]  # sorted by destination, then process
    resets: tuple[ResetStats, ...]  # sorted by direction, peer, reason
    drops: tuple[DropStats, ...]  # sorted by reason, listener
    host: TracepointHost
    # table (connects, resets, drops) -> events folded into its "other" row: their keys found no
    # row under the host-wide budget (collect.connection_peers); cumulative
    folded: Mapping[str, int] = field(default_factory=dict)
    # Rows the budget remembers but does not export this poll: a row that wins its place back
    # goes on from these (the rules' windows start from them too).
    held_connects: tuple[ConnectStats, ...] = ()
    held_resets: tuple[ResetStats, ...] = ()
    held_drops: tuple[DropStats, ...] = ()
    # As the source drains it: ``pending`` is True, the rows (and ``folded``) hold what was
    # counted since the previous drain and ``failed`` this drain's failed connects; the
    # pipeline's host-wide budget (tcpwatch/peer_budget.py) then sets the rows it exports
    # (cumulative), ``held``, ``folded``, no ``failed``, and ``pending`` False.
    pending: bool = False
    failed: tuple[FailedConnect, ...] = ()
