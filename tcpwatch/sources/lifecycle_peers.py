"""The bounded per-peer tracker of closed connections: destroy messages in, LifecycleStats out.

The hot path lives here (once per closed connection): it reads the raw messages itself rather
than building a DestroyEvent for each (lifecycle_events.py has the readable version of the same
classification, which the tests hold it to).

This module measures; it does not decide which peer gets a row of its own. Each drain reports,
per tracked (direction, peer), what closed since the previous drain and a decayed score of how
busy it is; the pipeline's host-wide budget (tcpwatch/peer_budget.py) gives rows to the busiest
pairs of every namespace and folds the rest into ``peer="other"``.
"""

from __future__ import annotations

import bisect
import struct
import time
from collections.abc import Callable, Iterable

from tcpwatch.model import DIRECTIONS, PEER_OTHER, LifecycleStats, PeerActivity
from tcpwatch.scores import FAILURE_WEIGHT as FAILURE_WEIGHT
from tcpwatch.scores import SCORE_HALF_LIFE_SECONDS
from tcpwatch.sources.lifecycle_batch import BatchColumns
from tcpwatch.sources.lifecycle_counts import PeerCounts
from tcpwatch.sources.lifecycle_counts import table_of as table_of
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
from tcpwatch.sources.tcpinfo import CLOSE_FIELDS, SND_WND, handshake_completed, parse_tcp_info
from tcpwatch.tracepoint_stats import ClearedClose

DEFAULT_MAX_PEERS = 115  # host-wide rows (collect.connection_peers' default)
DEFAULT_PEER_IDLE_SECONDS = 3600.0
_ROUTE_CACHE_LIMIT = 4096
U32 = struct.Struct("=I")  # a netlink attribute header read as one word
# Failed connects whose port the kernel cleared, kept by (family, local port, address) between
# two drains for the join (peer_join.py); past this many keys, by address alone (no port).
CLEARED_LIMIT = 8192


def tracked_peers(max_rows: int) -> int:
    """Peers tracked per namespace for a host-wide budget of ``max_rows`` rows: twice the rows
    (a namespace can never use more than the budget), at least 64, so a new busy peer is seen
    and scored before it can win a row."""
    return max(64, 2 * max_rows)


class LifecycleAggregator:
    """Classifies destroy messages and tracks bounded per-peer counts. Not thread-safe by itself.

    At most ``max_peers`` (direction, peer) pairs are tracked (tracked_peers() of the host-wide
    budget). A new pair is always tracked; when that would pass the limit, the less busy half
    (decayed score plus what closed since the last drain) is dropped first and its pending counts
    go to PEER_OTHER of their direction: an amortised space-saving scheme, so a peer that becomes
    busy is tracked from its first close on and is never locked out by earlier ones. A pair idle
    for ``peer_idle_seconds`` is dropped at the next drain. Counts are per drain (``stats()``
    resets them); rows, and what they show, are the host-wide budget's (peer_budget.py).
    """

    def __init__(
        self,
        max_peers: int = tracked_peers(DEFAULT_MAX_PEERS),
        peer_idle_seconds: float = DEFAULT_PEER_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        half_life: float = SCORE_HALF_LIFE_SECONDS,
    ) -> None:
        self.max_peers = max(max_peers, 2)
        self.peer_idle_seconds = peer_idle_seconds
        self.clock = clock
        self.half_life = half_life
        self.context = make_context((), None)
        self.events = 0
        self.ignored = 0
        self.evicted = 0  # tracked pairs dropped (less busy, or idle)
        self._peers: dict[tuple[int, str], PeerCounts] = {}
        self._other: dict[int, PeerCounts] = {}
        self.malformed = 0
        # (inbound?, family, port, 16-byte address) -> its row; cleared when the context
        # changes or a row goes, so no key outlives its row.
        self._routes: dict[tuple[bool, int, int, bytes], PeerCounts] = {}
        # (family, local port, 16-byte address) -> failed connects whose port was cleared
        self._cleared: dict[tuple[int, int, bytes], int] = {}
        self._drained_at = clock()
        self._layouts: dict[int, tuple[Callable[..., tuple[int, ...]], int]] = {}
        self.fast_path = True  # False: every message the long way (tests compare the two)
        self.columns = BatchColumns()  # a batch of one layout by columns (lifecycle_batch.py)
        self._idle_check_at = self._drained_at  # see _drop_idle

    def _fast_struct(self, info_at: int) -> tuple[Callable[..., tuple[int, ...]], int]:
        """One unpack of a message whose INET_DIAG_INFO attribute starts at ``info_at``: the
        message's length, type and family, the attribute's header word, CLOSE_FIELDS."""
        found = self._layouts.get(info_at)
        if found is None:
            layout = struct.Struct(f"=IH10xB{info_at - 17}xI{CLOSE_FIELDS.format[1:]}")
            found = self._layouts[info_at] = (layout.unpack_from, layout.size)
        return found

    def update_context(self, context: Context) -> None:
        if context != self.context:
            self.context = context
            self._routes.clear()

    def feed(self, data: bytes | memoryview, length: int) -> None:
        """Count every event of one datagram; SockDiagError on garbage (earlier ones count)."""
        self.consume(data, (length,), strict=True)

    def consume(
        self,
        data: bytes | memoryview,
        lengths: Iterable[int],
        strict: bool = False,
        stride: int = 0,
    ) -> int:
        """Count the events of each datagram, one per ``lengths`` item: datagram ``i`` is
        ``data[i * stride : i * stride + lengths[i]]`` (recvbatch.BatchReceiver's slots; with
        ``stride`` 0 each is at the start, and ``lengths`` may be a generator refilling it).

        A datagram that does not parse, or was cut (length -1: longer than its slot), is counted
        in ``malformed`` (strict: raised) and the rest of it skipped. Returns the datagrams
        consumed.

        The hot path (once per closed connection): one unpack for the addresses, one for the
        tcp_info fields, one dict lookup from the raw (port, address) to the peer's row; or,
        for a batch of one layout whose peers are all cached, columns (lifecycle_batch.py).
        """
        now = self.clock()
        if (
            self.fast_path
            and isinstance(lengths, list)
            and self.columns.count_batch(data, lengths, stride, self.context, self._routes, now)
        ):
            self.events += len(lengths)
            return len(lengths)
        context = self.context
        listen_ports = context.listen_ports
        low, high = context.port_range
        routes = self._routes
        cleared = self._cleared
        head = NLMSG_HEAD.unpack_from
        attr = NLATTR.unpack_from
        endpoints = ENDPOINTS.unpack_from
        close_fields = CLOSE_FIELDS.unpack_from
        close_size = CLOSE_FIELDS.size
        snd_wnd = SND_WND.unpack_from
        wnd_size = SND_WND.size
        bounds = RTT_BOUNDS_US
        bisect_left = bisect.bisect_left
        datagrams = events = ignored = 0
        word = U32.unpack_from
        info_at, info_end, info_header = INET_DIAG_MSG_MIN, 4, -1  # the last INFO attribute seen
        # That layout's one unpack (_fast_struct), once a message of it held every CLOSE_FIELDS
        fast: Callable[..., tuple[int, ...]] = head
        fast_size, fast_at, fast_header, fast_end, fast_info = 0, 0, -1, 0, 0
        use_fast = self.fast_path
        try:
            for length in lengths:
                offset = datagrams * stride
                datagrams += 1
                try:
                    if length < 0:
                        raise SockDiagError("datagram longer than the receive slot (truncated)")
                    length += offset  # the datagram's end in ``data``
                    while offset < length:
                        start = offset
                        if fast_size > 0 and start + fast_size <= length:
                            (msg_len, msg_type, family_number, info_word, rtt, retrans, acked,
                             received, segs_out, segs_in, busy, rwnd, sndbuf, delivered
                             ) = fast(data, start)  # fmt: skip
                        else:
                            msg_type = -1
                        if (  # the layout of the previous message: one unpack (_fast_struct)
                            msg_type == SOCK_DIAG_BY_FAMILY
                            and info_word == fast_header
                            and fast_end <= msg_len
                            and start + msg_len <= length
                            and family_number in ADDRESS_BYTES
                        ):
                            end = start + msg_len
                            offset = (end + 3) & ~3
                            events += 1
                            sport, dport, src, dst = endpoints(data, start + 20)
                            if dport == 0 and dst == ZERO16:
                                ignored += 1
                                continue
                            position, size = start + fast_at, fast_info
                        else:
                            if length - offset < 16:
                                raise SockDiagError(
                                    f"truncated netlink header at byte {offset} of {length}"
                                )
                            msg_len, msg_type = head(data, offset)
                            start = offset
                            if (
                                msg_type != SOCK_DIAG_BY_FAMILY
                                or msg_len < INET_DIAG_MSG_MIN
                                or start + msg_len > length
                                or (family_number := data[start + 16]) not in ADDRESS_BYTES
                            ):
                                check_other_message(data, offset, msg_len, msg_type, length)
                                offset += (msg_len + 3) & ~3
                                continue
                            end = offset + msg_len
                            offset = (end + 3) & ~3
                            events += 1
                            sport, dport, src, dst = endpoints(data, start + 20)
                            if dport == 0 and dst == ZERO16:
                                ignored += 1  # a closed listener, or one that never connected
                                continue
                            # INET_DIAG_INFO: where the previous message had it, the same
                            # attribute header (the kernel writes one layout: after PROTOCOL on
                            # 6.18), else walk
                            position = start + info_at
                            if (
                                position + info_end <= end
                                and word(data, position)[0] == info_header
                            ):
                                size = info_end - 4
                            else:
                                size = -1
                                position = start + INET_DIAG_MSG_MIN
                            while size < 0 and position + 4 <= end:
                                attr_len, attr_type = attr(data, position)
                                if attr_len < 4 or position + attr_len > end:
                                    break
                                if attr_type & 0x3FFF == INET_DIAG_INFO:
                                    size = attr_len - 4
                                    info_at, info_end = position - start, attr_len
                                    info_header = word(data, position)[0]
                                    break
                                position += (attr_len + 3) & ~3
                            if size < 0:
                                ignored += 1
                                continue
                            if size >= close_size:
                                (rtt, retrans, acked, received, segs_out, segs_in, busy, rwnd,
                                 sndbuf, delivered) = close_fields(data, position + 4)  # fmt: skip
                                if use_fast and (info_at, info_header) != (fast_at, fast_header):
                                    fast_at, fast_header = info_at, info_header  # a new layout
                                    fast_end, fast_info = info_at + info_end, info_end - 4
                                    fast, fast_size = self._fast_struct(info_at)
                            else:
                                tail = position + 4
                                info = parse_tcp_info(bytes(data[tail : tail + size]))
                                (rtt, retrans, acked, received, segs_out, segs_in, busy, rwnd,
                                 sndbuf, delivered) = fields_of(info)  # fmt: skip
                        inbound = sport in listen_ports or not low <= sport <= high
                        done = dport != 0 or handshake_completed(data, position + 4, size)
                        if not (done or inbound):  # a failed connect tcp_disconnect cleared: kept
                            kept = (family_number, sport, dst)  # by what it has (peer_join.py)
                            if kept not in cleared and len(cleared) >= CLEARED_LIMIT:
                                kept = (family_number, 0, dst)
                            if kept in cleared or len(cleared) < 2 * CLEARED_LIMIT:
                                cleared[kept] = cleared.get(kept, 0) + 1
                                continue
                        key = (True, family_number, sport, src) if inbound else (
                            False, family_number, dport, dst
                        )  # fmt: skip
                        peer = routes.get(key)
                        if peer is None:
                            peer = self._route(key, now)
                        if dport == 0:  # cleared by tcp_disconnect: did it ever connect?
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
                        if busy:  # the limited times are part of it, and mostly 0
                            peer.busy_us += busy
                            if rwnd:
                                peer.rwnd_us += rwnd
                                if size >= wnd_size and not snd_wnd(data, position + 4)[0]:
                                    peer.zero_window += 1  # held back by the peer, shut at the end
                            if sndbuf:
                                peer.sndbuf_us += sndbuf
                        peer.last_seen = now
                except SockDiagError:
                    if strict:
                        raise
                    self.malformed += 1
        finally:  # once per batch, not per datagram
            self.events += events
            self.ignored += ignored
        return datagrams

    def _route(self, key: tuple[bool, int, int, bytes], now: float) -> PeerCounts:
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

    def _admit(self, direction: int, label: str, now: float) -> PeerCounts:
        if len(self._peers) >= self.max_peers:
            self._trim(self.max_peers // 2)
        peer = self._peers[(direction, label)] = PeerCounts(now, direction, label)
        return peer

    def _trim(self, keep: int) -> None:
        """Keep the ``keep`` busiest pairs; the others' pending counts go to PEER_OTHER."""
        now = self.clock()
        ranked = sorted(
            self._peers.items(),
            key=lambda item: item[1].decayed(now, self.half_life) + item[1].weight(),
            reverse=True,
        )
        for key, peer in ranked[keep:]:
            self._drop(key, peer)
        self._routes.clear()

    def _drop_idle(self, now: float) -> None:
        """Drop the pairs idle ``peer_idle_seconds`` with nothing pending; note when the stalest
        one left can be idle (last_seen only grows, so no pair goes idle before that)."""
        idle = [
            (key, peer)
            for key, peer in self._peers.items()
            if now - peer.last_seen >= self.peer_idle_seconds and not peer.pending()
        ]
        for key, peer in idle:
            self._drop(key, peer)
        if idle:
            self._routes.clear()
        stalest = min((peer.last_seen for peer in self._peers.values()), default=now)
        self._idle_check_at = stalest + self.peer_idle_seconds

    def _drop(self, key: tuple[int, str], peer: PeerCounts) -> None:
        del self._peers[key]
        self.evicted += 1
        if peer.pending():
            other = self._other.get(key[0])
            if other is None:
                other = self._other[key[0]] = PeerCounts(peer.last_seen)
            other.absorb(peer)

    def stats(self, overruns: int, lost: int | None, receive_buffer: int) -> LifecycleStats:
        """Everything since the previous call: each tracked pair's counts and score (then reset),
        and the cumulative totals of the listener.

        In proportion to the pairs that changed: a pair with no close since the previous drain
        (last_seen before it) is listed as the previous drain listed it (score as of its last
        close: peer_budget.py scores anew); the idle scan runs only once the stalest pair can
        have been idle ``peer_idle_seconds``."""
        now = self.clock()
        since, self._drained_at = self._drained_at, now
        if now >= self._idle_check_at:
            self._drop_idle(now)
        activity: list[PeerActivity] = []
        for (direction, label), peer in self._peers.items():
            if peer.last_seen >= since and peer.pending():
                peer.score = peer.decayed(now, self.half_life) + peer.weight()
                peer.scored_at = now
                delta = peer.frozen(direction, label)
                activity.append(PeerActivity(DIRECTIONS[direction], label, peer.score, delta))
                peer.listed = PeerActivity(DIRECTIONS[direction], label, peer.score, None)
                peer.reset()
            else:
                activity.append(peer.listed)
        for direction, other in self._other.items():
            if other.pending():
                delta = other.frozen(direction, PEER_OTHER)
                activity.append(PeerActivity(DIRECTIONS[direction], PEER_OTHER, 0.0, delta))
                other.reset()
        cleared = tuple(
            ClearedClose(family_number, port, outbound_peer(family_number, address, 0), count)
            for (family_number, port, address), count in self._cleared.items()
        )
        self._cleared.clear()
        return LifecycleStats(
            peers=(),
            events=self.events,
            ignored=self.ignored,
            malformed=self.malformed,
            overruns=overruns,
            lost=lost,
            max_peers=self.max_peers,
            evicted=self.evicted,
            receive_buffer=receive_buffer,
            activity=tuple(activity),
            cleared=cleared,
        )
