"""Where live connections spend their time and what waits in their queues: the data the two
live scans yield (the per-destination scan, sources/sockdiag.py; the listeners' connections,
sources/inbound.py), per peer, and the view of both per (direction, peer).

Kept apart from model.py (which holds these in DestinationUse and Snapshot) to keep each module
one screenful of one subject; it imports nothing of tcpwatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tcpwatch.endpoints import endpoint

WORST_KEPT = 5  # worst connections a merged peer keeps


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """One live ESTABLISHED connection worth showing: where its time went, what waits in its
    queues (``ss -tinm`` prints the same fields). None: the kernel did not report the field."""

    local: str  # "10.0.0.1:41822", as ss writes endpoints
    remote: str
    inode: int
    receive_queue: int  # Recv-Q: bytes received that the application has not read
    send_queue: int  # Send-Q: bytes written, not yet acknowledged by the peer
    zero_window: bool  # the zero-window probe timer is armed: the peer's window is closed
    receive_memory: int | None  # skmem r: receive buffer memory in use
    receive_buffer: int | None  # skmem rb: the receive buffer's size
    send_buffer: int | None  # skmem tb: the send buffer's size (SO_SNDBUF, or tcp_wmem's tuning)
    drops: int | None  # skmem d: packets the kernel dropped at this socket
    peer_window: int | None  # tcpi_snd_wnd: the peer's advertised window, bytes (5.4+)
    busy_seconds: float | None  # tcpi_busy_time: time with data to send (4.10+)
    rwnd_limited_seconds: float | None  # of it, waiting on the peer's receive window
    sndbuf_limited_seconds: float | None  # of it, waiting on this socket's send buffer
    rtt_seconds: float  # tcpi_rtt, smoothed
    min_rtt_seconds: float | None  # tcpi_min_rtt (4.6+)
    delivery_rate: int | None  # tcpi_delivery_rate, bytes per second (4.9+)
    retransmitted: int  # tcpi_total_retrans
    rto_recoveries: int | None  # tcpi_total_rto_recoveries (6.7+)


@dataclass(frozen=True, slots=True)
class Stalls:
    """Where the live connections of one peer (a destination, or a listener's clients) spent
    their time and what waits in their queues, at one scan. The times are summed over each
    live connection's life so far (tcpi_busy_time and the limits, microseconds in the kernel);
    busy includes the two limited times, so ``rwnd_limited_seconds / busy_seconds`` is the share
    of sending time spent waiting on the receivers (``ss -ti`` prints the same share per
    connection). None: the kernel's tcp_info or SKMEMINFO is too old to say."""

    connections: int
    busy_seconds: float | None
    rwnd_limited_seconds: float | None
    sndbuf_limited_seconds: float | None
    send_queue_bytes: int  # Send-Q summed
    send_queue_max_bytes: int
    receive_queue_bytes: int  # Recv-Q summed
    receive_queue_max_bytes: int
    zero_window: int  # connections probing a closed (zero) peer window now: persist timer
    receive_full: int  # connections holding data with half or more of their receive buffer used
    drops: int | None  # skmem d summed: packets dropped at these sockets over their lives
    retransmits_in_flight: int  # tcpi_retrans summed
    rto_recoveries: int | None  # tcpi_total_rto_recoveries summed (6.7+)
    rto_seconds: float | None  # tcpi_total_rto_time summed (6.7+)
    rwnd_limited_connections: int = 0  # connections that ever waited on the peer's window
    sndbuf_limited_connections: int = 0  # connections that ever waited on their send buffer
    segments_sent: int = 0  # tcpi_segs_out summed
    segments_retransmitted: int = 0  # tcpi_total_retrans summed
    # Of them, those the peer reported received twice (D-SACK, tcpi_dsack_dups, 4.19+): the
    # original had arrived, so the retransmission was spurious (reordering, an early RTO or
    # tail-loss probe), not a loss. Per connection at most its total_retrans. None: no kernel
    # count (older kernel).
    segments_spurious: int | None = None
    worst: tuple[LiveConnection, ...] = ()  # a few connections that show the most, for evidence

    @property
    def segments_retransmitted_not_spurious(self) -> int:
        """Retransmissions the peer did not report as duplicates: the ones that repaired a
        loss, as far as the kernel can tell (all of them when the peer sends no D-SACK)."""
        return self.segments_retransmitted - (self.segments_spurious or 0)

    def share(self, limited: float | None) -> float | None:
        """``limited`` (one of the limited times) as a share of busy time."""
        if limited is None or not self.busy_seconds:
            return None
        return min(limited / self.busy_seconds, 1.0)


@dataclass(frozen=True, slots=True)
class ListenerConnections:
    """One listener's live connections (its clients), as the inbound scan read them."""

    listener: str  # as `ss -lnt` writes it, "0.0.0.0:8080": the inbound peer of docs/connections.md
    family: str
    address: str
    port: int
    inode: int  # the listening socket's (a SO_REUSEPORT group's first): who owns it
    stalls: Stalls


@dataclass(frozen=True, slots=True)
class InboundScan:
    """The bounded scan of the ESTABLISHED connections listeners accepted (source ``inbound``,
    sources/inbound.py): tcp_info and socket memory of at most ``limit`` connections."""

    listeners: tuple[ListenerConnections, ...]  # with at least one connection, by listener
    connections: int  # connections read
    limit: int  # collect.inbound_connections
    complete: bool  # every such connection was read: the limit did not cut the scan short
    unmatched: int  # read, but on a port whose listener is gone (not in the poll's listeners)
    scanned_at: float  # unix time; an earlier poll's when collect.destinations_interval spared it


@dataclass(frozen=True, slots=True)
class ClosedWaits:
    """Where the connections of one peer row that closed spent their time, from each one's
    tcp_info at close, summed (model.PeerStats.waits): microseconds, as the kernel counts them.
    busy includes both limited times (Linux 4.10+); a zero-window close is a connection that
    waited on its peer's window and ended while that window was shut (tcpi_snd_wnd 0, Linux
    5.4+): the peer had stopped reading. Before those kernels the counts stay 0."""

    busy_us: int = 0
    rwnd_limited_us: int = 0
    sndbuf_limited_us: int = 0
    zero_window_closes: int = 0

    def __add__(self, other: ClosedWaits) -> ClosedWaits:
        return ClosedWaits(
            self.busy_us + other.busy_us,
            self.rwnd_limited_us + other.rwnd_limited_us,
            self.sndbuf_limited_us + other.sndbuf_limited_us,
            self.zero_window_closes + other.zero_window_closes,
        )

    def __sub__(self, other: ClosedWaits) -> ClosedWaits:
        return ClosedWaits(
            self.busy_us - other.busy_us,
            self.rwnd_limited_us - other.rwnd_limited_us,
            self.sndbuf_limited_us - other.sndbuf_limited_us,
            self.zero_window_closes - other.zero_window_closes,
        )

    def went_back(self, earlier: ClosedWaits) -> bool:
        """Whether any count is below ``earlier``'s (the row restarted in between)."""
        return (
            self.busy_us < earlier.busy_us
            or self.rwnd_limited_us < earlier.rwnd_limited_us
            or self.sndbuf_limited_us < earlier.sndbuf_limited_us
            or self.zero_window_closes < earlier.zero_window_closes
        )


@dataclass(frozen=True, slots=True)
class LivePeer:
    """The live connections of one (direction, peer) at the latest scan: a listener's clients
    (inbound, named as the listener) or one destination (outbound, every source address
    together), as the connection metrics name peers."""

    direction: str  # "inbound" / "outbound"
    peer: str
    stalls: Stalls
    inode: int  # the listening socket's (inbound); 0 outbound: see stalls.worst for sockets


class _Table(Protocol):
    """What live_peers reads of a model.SocketTable."""

    @property
    def ephemeral_use(self) -> Sequence[_Destination]: ...


class _Destination(Protocol):
    """What live_peers reads of a model.DestinationUse."""

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def stalls(self) -> Stalls | None: ...


def _add(first: int | float | None, second: int | float | None) -> float | None:
    return None if first is None or second is None else first + second


def merge(parts: Iterable[Stalls]) -> Stalls:
    """Several peers' stalls as one (a destination seen from several source addresses): sums,
    maxima, and the worst connections of all, longest wait on the peer's window first."""
    items = list(parts)
    first = items[0]
    if len(items) == 1:
        return first

    def total(name: str) -> float | None:
        value: float | None = 0.0
        for item in items:
            value = _add(value, getattr(item, name))
        return value

    drops = total("drops")
    recoveries = total("rto_recoveries")
    spurious = total("segments_spurious")
    worst = sorted(
        (c for item in items for c in item.worst),
        key=lambda c: (-(c.rwnd_limited_seconds or 0.0), -c.receive_queue, c.local, c.remote),
    )
    return Stalls(
        connections=sum(item.connections for item in items),
        busy_seconds=total("busy_seconds"),
        rwnd_limited_seconds=total("rwnd_limited_seconds"),
        sndbuf_limited_seconds=total("sndbuf_limited_seconds"),
        send_queue_bytes=sum(item.send_queue_bytes for item in items),
        send_queue_max_bytes=max(item.send_queue_max_bytes for item in items),
        receive_queue_bytes=sum(item.receive_queue_bytes for item in items),
        receive_queue_max_bytes=max(item.receive_queue_max_bytes for item in items),
        zero_window=sum(item.zero_window for item in items),
        receive_full=sum(item.receive_full for item in items),
        drops=None if drops is None else int(drops),
        retransmits_in_flight=sum(item.retransmits_in_flight for item in items),
        rto_recoveries=None if recoveries is None else int(recoveries),
        rto_seconds=total("rto_seconds"),
        rwnd_limited_connections=sum(item.rwnd_limited_connections for item in items),
        sndbuf_limited_connections=sum(item.sndbuf_limited_connections for item in items),
        segments_sent=sum(item.segments_sent for item in items),
        segments_retransmitted=sum(item.segments_retransmitted for item in items),
        segments_spurious=None if spurious is None else int(spurious),
        worst=tuple(worst[:WORST_KEPT]),
    )


def live_peers(table: _Table | None, inbound: InboundScan | None) -> tuple[LivePeer, ...]:
    """Each (direction, peer)'s live connections, from both live scans of a snapshot (its
    ``sockets`` and ``inbound``): inbound peers (the listeners scanned) then outbound ones
    (destinations with a scan, every source address together), each sorted by peer."""
    destinations = table.ephemeral_use if table is not None else ()
    peers = [
        LivePeer("inbound", item.listener, item.stalls, item.inode)
        for item in (inbound.listeners if inbound is not None else ())
    ]
    grouped: dict[str, list[Stalls]] = {}
    for use in destinations:
        if use.stalls is not None and use.stalls.connections:
            grouped.setdefault(endpoint(use.address, use.port), []).append(use.stalls)
    peers.sort(key=lambda peer: peer.peer)
    peers += [
        LivePeer("outbound", name, merge(parts), 0) for name, parts in sorted(grouped.items())
    ]
    return tuple(peers)


# What waits on what, at the W rules' default thresholds (docs/rules/W01-W04): the live page's
# and `tcpwatch top`'s one-word answer per peer.
_RECEIVER_SHARE, _SNDBUF_SHARE, _BUSY_SECONDS = 0.5, 0.2, 1.0
_RETRANSMITTED, _SEGMENTS = 0.02, 500


def waiting_on(stalls: Stalls) -> str:
    """ "application" (data unread here), "receiver" (the peer's window), "send buffer",
    "network" (retransmissions), or "" when nothing stands out."""
    if stalls.receive_full:
        return "application"
    judged = (stalls.busy_seconds or 0.0) >= _BUSY_SECONDS
    if stalls.zero_window or (
        judged and (stalls.share(stalls.rwnd_limited_seconds) or 0.0) >= _RECEIVER_SHARE
    ):
        return "receiver"
    if judged and (stalls.share(stalls.sndbuf_limited_seconds) or 0.0) >= _SNDBUF_SHARE:
        return "send buffer"
    sent = stalls.segments_sent
    if sent >= _SEGMENTS and stalls.segments_retransmitted_not_spurious / sent >= _RETRANSMITTED:
        return "network"
    return ""


def slowness(peer: LivePeer) -> tuple[bool, float, int, str, str]:
    """A sort key: peers that wait on something first, then by time spent waiting, then by
    queued bytes."""
    stalls = peer.stalls
    waited = (stalls.rwnd_limited_seconds or 0.0) + (stalls.sndbuf_limited_seconds or 0.0)
    queued = stalls.receive_queue_bytes + stalls.send_queue_bytes
    return (not waiting_on(stalls), -waited, -queued, peer.direction, peer.peer)


def slowest(peers: Iterable[LivePeer]) -> list[LivePeer]:
    """The peers, slowest first (:func:`slowness`)."""
    return sorted(peers, key=slowness)
