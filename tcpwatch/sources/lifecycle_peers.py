"""The bounded per-peer table of closed connections: destroy messages in, LifecycleStats out.

The hot path lives here (once per closed connection): it reads the raw messages itself rather
than building a DestroyEvent for each (lifecycle_events.py has the readable version of the same
classification, which the tests hold it to).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable

from tcpwatch.model import DIRECTIONS, OUTCOMES, PEER_OTHER, LifecycleStats, PeerStats
from tcpwatch.sources.lifecycle_events import (
    ABORTED,
    ADDRESS_BYTES,
    ENDPOINTS,
    INBOUND,
    OK,
    OUTBOUND,
    REFUSED,
    RTT_BOUNDS_US,
    TIMEOUT,
    ZERO16,
    Context,
    check_other_message,
    fields_of,
    inbound_peer,
    make_context,
    outbound_peer,
)
from tcpwatch.sources.netlink import (
    INET_DIAG_INFO,
    NLATTR,
    NLMSG_HEAD,
    SOCK_DIAG_BY_FAMILY,
    SockDiagError,
)
from tcpwatch.sources.sockdiag import INET_DIAG_MSG_MIN
from tcpwatch.sources.tcpinfo import CLOSE_FIELDS, handshake_completed, parse_tcp_info

DEFAULT_MAX_PEERS = 100
DEFAULT_PEER_IDLE_SECONDS = 3600.0
_ROUTE_CACHE_LIMIT = 4096
_SWEEP_INTERVAL = 1.0  # seconds between idle-peer sweeps forced by a full table


class _Peer:
    """Mutable running totals of one (direction, peer); frozen into PeerStats by snapshots."""

    __slots__ = (
        "bytes_acked",
        "bytes_received",
        "closed",
        "folded",
        "last_seen",
        "retrans",
        "rtt",
        "rtt_count",
        "rtt_sum_us",
        "segs_out",
    )

    def __init__(self, now: float, folded: bool = False) -> None:
        self.folded = folded  # the PEER_OTHER row of its direction
        self.closed = [0] * len(OUTCOMES)
        self.rtt = [0] * (len(RTT_BOUNDS_US) + 1)
        self.rtt_count = 0
        self.rtt_sum_us = 0
        self.segs_out = 0
        self.retrans = 0
        self.bytes_acked = 0
        self.bytes_received = 0
        self.last_seen = now

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
        )


class LifecycleAggregator:
    """Classifies destroy messages and keeps bounded per-peer totals. Not thread-safe by itself.

    Peer table: at most ``max_peers`` (direction, peer) rows, plus one PEER_OTHER row per
    direction for events of peers that found the table full. A row is never moved or reset
    while it exists, so every series it yields only grows. A row idle (no event) for
    ``peer_idle_seconds`` is removed at the next sweep (each ``stats()``, and at most once a
    second when a new peer finds the table full): its series end, its counts are not moved
    into PEER_OTHER (that would make PEER_OTHER's rate jump), and a later event of that peer
    starts a new row from zero.
    """

    def __init__(
        self,
        max_peers: int = DEFAULT_MAX_PEERS,
        peer_idle_seconds: float = DEFAULT_PEER_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_peers = max_peers
        self.peer_idle_seconds = peer_idle_seconds
        self.clock = clock
        self.context = make_context((), None)
        self.events = 0
        self.ignored = 0
        self.evicted = 0
        self._peers: dict[tuple[int, str], _Peer] = {}
        self._other: dict[int, _Peer] = {}
        self.malformed = 0
        # (inbound?, family, port, 16-byte address) -> its row (PEER_OTHER's when folded);
        # cleared when the context changes or a row goes, so no key outlives its row.
        self._routes: dict[tuple[bool, int, int, bytes], _Peer] = {}
        self._last_sweep = clock()

    def update_context(self, context: Context) -> None:
        if context != self.context:
            self.context = context
            self._routes.clear()

    def feed(self, data: bytes | memoryview, length: int) -> None:
        """Count every event of one datagram; SockDiagError on garbage (earlier ones count)."""
        self.consume(data, (length,), strict=True)

    def consume(
        self, data: bytes | memoryview, lengths: Iterable[int], strict: bool = False
    ) -> int:
        """Count the events of each datagram ``data[:length]``, one per ``lengths`` item.

        ``lengths`` may be a generator that refills ``data`` (DestroyListener's recv loop). A
        datagram that does not parse is counted in ``malformed`` (strict: raised) and the rest
        of it skipped. Returns the datagrams consumed.

        The hot path (once per closed connection): one unpack for the addresses, one for the
        tcp_info fields, one dict lookup from the raw (port, address) to the peer's row.
        """
        now = self.clock()
        context = self.context
        listen_ports = context.listen_ports
        low, high = context.port_range
        routes = self._routes
        head = NLMSG_HEAD.unpack_from
        attr = NLATTR.unpack_from
        endpoints = ENDPOINTS.unpack_from
        close_fields = CLOSE_FIELDS.unpack_from
        close_size = CLOSE_FIELDS.size
        bounds = RTT_BOUNDS_US
        bisect_left = bisect.bisect_left
        datagrams = events = ignored = 0
        for length in lengths:
            datagrams += 1
            offset = 0
            try:
                while offset < length:
                    if length - offset < 16:
                        raise SockDiagError(
                            f"truncated netlink header at byte {offset} of {length}"
                        )
                    msg_len, msg_type = head(data, offset)
                    if (
                        msg_type != SOCK_DIAG_BY_FAMILY
                        or msg_len < INET_DIAG_MSG_MIN
                        or offset + msg_len > length
                        or data[offset + 16] not in ADDRESS_BYTES
                    ):
                        check_other_message(data, offset, msg_len, msg_type, length)
                        offset += (msg_len + 3) & ~3
                        continue
                    end = offset + msg_len
                    offset = (end + 3) & ~3
                    events += 1
                    sport, dport, src, dst = endpoints(data, end - msg_len + 20)
                    if dport == 0 and dst == ZERO16:
                        ignored += 1  # a closed listener, or a socket that never connected
                        continue
                    # INET_DIAG_INFO: the second attribute on 6.18 (after PROTOCOL); walk to it
                    position = end - msg_len + INET_DIAG_MSG_MIN
                    size = -1
                    while position + 4 <= end:
                        attr_len, attr_type = attr(data, position)
                        if attr_len < 4 or position + attr_len > end:
                            break
                        if attr_type & 0x3FFF == INET_DIAG_INFO:
                            size = attr_len - 4
                            break
                        position += (attr_len + 3) & ~3
                    if size < 0:
                        ignored += 1
                        continue
                    if size >= close_size:
                        rtt, retrans, acked, received, segs_out, segs_in, delivered = close_fields(
                            data, position + 4
                        )
                    else:
                        info = parse_tcp_info(bytes(data[position + 4 : position + 4 + size]))
                        rtt, retrans, acked, received, segs_out, segs_in, delivered = fields_of(
                            info
                        )
                    inbound = sport in listen_ports or not low <= sport <= high
                    family_number = data[end - msg_len + 16]
                    key = (True, family_number, sport, src) if inbound else (
                        False, family_number, dport, dst
                    )  # fmt: skip
                    peer = routes.get(key)
                    if peer is None or (peer.folded and now - self._last_sweep >= _SWEEP_INTERVAL):
                        peer = self._route(key, now)  # new, or folded: a sweep may free a row
                    if dport == 0:  # cleared by tcp_disconnect: did it ever connect?
                        done = handshake_completed(data, position + 4, size)
                        peer.closed[OK if done else ABORTED] += 1
                    elif delivered:
                        peer.closed[OK] += 1
                    elif segs_in:
                        peer.closed[REFUSED] += 1
                    else:
                        peer.closed[TIMEOUT] += 1
                    if rtt:
                        peer.rtt[bisect_left(bounds, rtt)] += 1
                        peer.rtt_count += 1
                        peer.rtt_sum_us += rtt
                    peer.segs_out += segs_out
                    peer.retrans += retrans
                    peer.bytes_acked += acked
                    peer.bytes_received += received
                    peer.last_seen = now
            except SockDiagError:
                if strict:
                    raise
                self.malformed += 1
            finally:
                self.events += events
                self.ignored += ignored
                events = ignored = 0
        return datagrams

    def _route(self, key: tuple[bool, int, int, bytes], now: float) -> _Peer:
        """The row for a raw (direction, family, port, address) key: named, admitted, cached."""
        inbound, family_number, port, address = key
        if inbound:
            label = inbound_peer(family_number, address, port, self.context)
        else:
            label = outbound_peer(family_number, address, port)
        direction = INBOUND if inbound else OUTBOUND
        peer = self._peers.get((direction, label)) or self._admit(direction, label, now)
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[key] = peer
        return peer

    def _admit(self, direction: int, label: str, now: float) -> _Peer:
        if len(self._peers) >= self.max_peers and now - self._last_sweep >= _SWEEP_INTERVAL:
            self._sweep(now)
        if len(self._peers) < self.max_peers:
            peer = self._peers[(direction, label)] = _Peer(now)
            return peer
        other = self._other.get(direction)
        if other is None:
            other = self._other[direction] = _Peer(now, folded=True)
        return other

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        idle = [
            key
            for key, peer in self._peers.items()
            if now - peer.last_seen >= self.peer_idle_seconds
        ]
        for key in idle:
            del self._peers[key]
        if idle:
            self.evicted += len(idle)
            self._routes.clear()

    def stats(self, overruns: int, lost: int | None, receive_buffer: int) -> LifecycleStats:
        self._sweep(self.clock())
        rows = [peer.frozen(direction, label) for (direction, label), peer in self._peers.items()]
        rows += [peer.frozen(direction, PEER_OTHER) for direction, peer in self._other.items()]
        rows.sort(key=lambda row: (row.direction, row.peer))
        return LifecycleStats(
            peers=tuple(rows),
            events=self.events,
            ignored=self.ignored,
            malformed=self.malformed,
            overruns=overruns,
            lost=lost,
            max_peers=self.max_peers,
            evicted=self.evicted,
            receive_buffer=receive_buffer,
        )
