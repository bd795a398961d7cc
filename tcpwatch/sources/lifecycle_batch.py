"""A recvmmsg batch of destroy messages counted by columns: the same counts as the per-event
loop of lifecycle_peers.LifecycleAggregator.consume, in a few C-level passes over the batch.

Under churn every datagram is one message of the same layout, so one ``struct`` covering a whole
slot (recvbatch: datagram ``i`` at ``i * stride``) unpacks the batch in one ``iter_unpack`` and
``zip`` turns it into columns; validation, direction (a table by port), grouping by peer and the
sums are then ``count``, ``bytes.translate``, ``set``, ``compress``, ``sum`` over columns, in C,
rather than Python statements per event. Fields that matter only now and then (segs_in of a
failed connect; rwnd- and sndbuf-limited time and snd_wnd with busy time) are unpacked only
for a batch that has such an event.

Exact, or not taken (``count_batch`` returns False having changed nothing; the caller then runs
the per-event loop on the whole batch), because it is taken only when:

* every datagram has the same length, that of its one message (msg_len), SOCK_DIAG_BY_FAMILY,
  and each attribute up to INET_DIAG_INFO has the header word of the first datagram's (so the
  per-event attribute walk, and its one-unpack path, find INFO at the same offset in every
  message), INFO long enough for every field read (up to snd_wnd);
* no event has destination port 0 (closed listeners, connects tcp_disconnect cleared: the
  per-event loop's other branches);
* every event's route (direction, family, port, address) is already in the route cache (which
  holds known families only: an unknown one, malformed for the loop, is never cached), so no
  admission, trim or cache clearing happens inside the batch: each event adds to its peer's
  integer counts, and integer sums commute; ``last_seen`` is the batch's one ``now``.

Each branch of the per-event loop has its column form: outcome by ``delivered`` then
``segs_in``; the RTT histogram over the non-zero RTTs; the limited times and zero windows only of
events with busy time.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from itertools import compress
from operator import and_, itemgetter, not_
from typing import Any

from tcpwatch.sources.lifecycle_counts import PeerCounts
from tcpwatch.sources.lifecycle_events import (
    OK,
    REFUSED,
    RTT_BOUNDS_US,
    TIMEOUT,
    Context,
)
from tcpwatch.sources.netlink import INET_DIAG_INFO, NLATTR, NLMSG_HEAD, SOCK_DIAG_BY_FAMILY
from tcpwatch.sources.sockdiag import INET_DIAG_MSG_MIN
from tcpwatch.sources.tcpinfo import SND_WND

Route = tuple[bool, int, int, bytes]
Columns = list[tuple[Any, ...]]
_FLIP = bytes.maketrans(b"\0\1", b"\1\0")
_MIN_BATCH = 16  # a batch costs ~13 us more than its events: smaller ones, the loop is cheaper
_MAX_KEYS = 8  # more peers of one direction in a batch: the per-event loop
# One slot: family, ports (read in host order: _port), addresses, then tcp_info's rtt,
# total_retrans, bytes_acked, bytes_received, segs_out, busy_time, delivered (CLOSE_FIELDS'
# offsets). The header words (length, type, attribute headers) are compared apart, in C.
_HEAD = "=16xB3xHH16s16s"
_INFO = "68xI28xI16xQQI28xQ16xI"
_FAMILY, _SPORT, _DPORT, _SRC, _DST = range(5)
_RTT, _RETRANS, _ACKED, _RECEIVED, _SEGS_OUT, _BUSY, _DELIVERED = range(5, 12)
_SUMS = (_RTT, _RETRANS, _ACKED, _RECEIVED, _SEGS_OUT, _BUSY)
# RTT (us) -> its bucket, bisect_left(RTT_BOUNDS_US, rtt), as one byte; RTT 0 -> _NO_RTT
_NO_RTT = 255
_NO_RTT_SET = frozenset((_NO_RTT,))


def _bucket_table(size: int) -> bytes:
    """Byte ``rtt`` is ``bisect_left(RTT_BOUNDS_US, rtt)`` (RTTs up to ``size`` - 1 us)."""
    table = bytearray([_NO_RTT])
    for bucket, bound in enumerate((*RTT_BOUNDS_US, size - 1)):
        table += bytes([bucket]) * max(min(bound, size - 1) + 1 - len(table), 0)
    return bytes(table)


_BUCKETS = _bucket_table(1 << 16)
_SEGS_IN = "140xI"  # read only for a batch with a failed connect
_WAITS = "176xQQ36xI"  # rwnd_limited, sndbuf_limited, snd_wnd: only for one with busy time


class _Layout:
    """The first datagram's: its length, attribute headers before tcp_info, the slot structs."""

    __slots__ = ("expected", "length", "segs_in", "slot", "stride", "waits", "words")

    def __init__(self, length: int, words: list[tuple[int, int]], info: int, stride: int) -> None:
        self.length, self.stride = length, stride
        # (the field's size, its offset, its value in every message): msg_len, type, then the
        # header word of each attribute up to INFO's
        self.words = [(4, 0, length), (2, 4, SOCK_DIAG_BY_FAMILY)]
        self.words += [(4, at, word) for at, word in words]
        self.expected: dict[int, list[memoryview]] = {}  # by batch size: the words repeated
        self.slot = _slot(f"{_HEAD}{info - 56}x{_INFO}", stride)  # the addresses end at 56
        self.segs_in = _slot(f"={info}x{_SEGS_IN}", stride)
        self.waits = _slot(f"={info}x{_WAITS}", stride)

    def valid(self, view: memoryview, count: int) -> bool:
        """Whether every slot has the header words of the first datagram learnt."""
        expected = self.expected.get(count)
        if expected is None:
            codes = {2: "H", 4: "I"}
            expected = [memoryview(array(codes[size], [value]) * count)
                        for size, _, value in self.words]  # fmt: skip
            self.expected = {count: expected}
        u16, u32 = view.cast("H"), view.cast("I")
        for (size, at, _), values in zip(self.words, expected, strict=True):
            step = self.stride // size
            if (u32 if size == 4 else u16)[at // size :: step] != values:
                return False
        return True


def _slot(code: str, stride: int) -> struct.Struct:
    return struct.Struct(f"{code}{stride - struct.calcsize(code)}x")


def _learn(data: memoryview, length: int, stride: int) -> _Layout | None:
    """The first datagram's layout, if it is one destroy message whose tcp_info holds every
    field read (up to snd_wnd)."""
    if not INET_DIAG_MSG_MIN <= length <= stride:
        return None
    msg_len, msg_type = NLMSG_HEAD.unpack_from(data, 0)
    if msg_len != length or msg_type != SOCK_DIAG_BY_FAMILY:
        return None
    position = INET_DIAG_MSG_MIN
    words: list[tuple[int, int]] = []
    while position + 4 <= length:
        attr_len, attr_type = NLATTR.unpack_from(data, position)
        if attr_len < 4 or position + attr_len > length:
            return None
        words.append((position, attr_len | attr_type << 16))
        if attr_type & 0x3FFF == INET_DIAG_INFO:
            if attr_len - 4 < SND_WND.size or stride % 4:
                return None
            return _Layout(length, words, position + 4, stride)
        position += (attr_len + 3) & ~3
    return None


def _port(native: int) -> int:
    """A port read in host order as the network-order number it is."""
    return int.from_bytes(native.to_bytes(2, sys.byteorder), "big")


def _outbound_table(context: Context) -> bytes:
    """1 at each local port (as read in host order) of an outbound connection, else 0: the
    per-event test, ``sport in listen_ports or not low <= sport <= high`` for inbound."""
    table = bytearray(65536)
    low, high = max(context.port_range[0], 0), min(context.port_range[1], 65535)
    if low <= high:
        table[low : high + 1] = b"\1" * (high - low + 1)
    for port in context.listen_ports:
        if 0 <= port <= 65535:
            table[port] = 0
    if sys.byteorder == "little":  # read in host order, port hi:lo is at lo * 256 + hi
        return b"".join(table[low_byte::256] for low_byte in range(256))
    return bytes(table)


class BatchColumns:
    """The columnar path's caches (the layout, the direction table) and how often it was taken."""

    def __init__(self) -> None:
        self.taken = 0  # batches counted by columns (tests see it was taken)
        self._layout: _Layout | None = None
        self._context: Context | None = None
        self._outbound = b""

    def count_batch(
        self,
        data: bytes | memoryview,
        lengths: list[int],
        stride: int,
        context: Context,
        routes: dict[Route, PeerCounts],
        now: float,
    ) -> bool:
        """Count a whole batch into the cached routes' rows; False (nothing counted) when one
        of the module docstring's conditions does not hold."""
        count = len(lengths)
        length = lengths[0] if count >= _MIN_BATCH else -1
        if length <= 0 or lengths.count(length) != count or len(data) < count * stride:
            return False
        view = memoryview(data).cast("B")[: count * stride]
        layout = self._layout
        if layout is None or layout.length != length or layout.stride != stride:
            layout = self._layout = _learn(view, length, stride)
            if layout is None:
                return False
        if not layout.valid(view, count):
            self._layout = None  # learnt anew from the next batch
            return False
        columns = list(zip(*layout.slot.iter_unpack(view), strict=True))
        sport, dport = columns[_SPORT], columns[_DPORT]
        if 0 in dport:
            return False
        if context is not self._context:
            self._context, self._outbound = context, _outbound_table(context)
        outbound = bytes(itemgetter(*sport)(self._outbound))
        groups: list[tuple[PeerCounts, bytes]] = []
        for inbound, mask in ((True, outbound.translate(_FLIP)), (False, outbound)):
            if 1 in mask and not _peers(columns, inbound, mask, routes, groups):
                return False
        _count(groups, columns, layout, view, now)
        self.taken += 1
        return True


def _peers(
    columns: Columns,
    inbound: bool,
    mask: bytes,
    routes: dict[Route, PeerCounts],
    groups: list[tuple[PeerCounts, bytes]],
) -> bool:
    """The events of one direction (``mask``) by peer, each peer's route cached."""
    count = len(mask)
    key = family, port, address = (
        columns[_FAMILY],
        *(columns[1:4:2] if inbound else columns[2:5:2]),
    )
    families = {family[0]} if family.count(family[0]) == count else set(compress(family, mask))
    ports = set(compress(port, mask))
    addresses = {address[0]} if address.count(address[0]) == count else set(compress(address, mask))
    if len(families) == len(ports) == len(addresses) == 1:  # one peer: the usual case
        keys = {(families.pop(), ports.pop(), addresses.pop())}
    else:
        keys = set(compress(zip(*key, strict=True), mask))
        if len(keys) > _MAX_KEYS:
            return False
    for wanted in keys:
        peer = routes.get((inbound, wanted[0], _port(wanted[1]), wanted[2]))
        if peer is None:
            return False
        rows = mask
        if len(keys) > 1:
            rows = bytes(map(and_, map(wanted.__eq__, zip(*key, strict=True)), mask))
        groups.append((peer, rows))
    return True


def _count(
    groups: list[tuple[PeerCounts, bytes]],
    columns: Columns,
    layout: _Layout,
    view: memoryview,
    now: float,
) -> None:
    """What the per-event loop adds for each event, as sums over each peer's events (the groups
    partition the batch: the last one gets what the others did not; integer sums are exact)."""
    sums = [[0] * len(_SUMS) for _ in groups]
    for index, field in enumerate(_SUMS):
        column = columns[field]
        rest = sum(column)
        for group, (_, rows) in enumerate(groups[:-1] if rest else ()):
            sums[group][index] = part = sum(compress(column, rows))
            rest -= part
        sums[-1][index] = rest
    rtt, delivered = columns[_RTT], columns[_DELIVERED]
    try:  # each event's RTT bucket, by a table (_NO_RTT for RTT 0, which is not counted)
        buckets: bytes | None = bytes(itemgetter(*rtt)(_BUCKETS))
    except IndexError:  # an RTT past the table: sorted and bisected (_histogram)
        buckets = None
    failures = 0 in delivered
    segs_in = _columns(layout.segs_in, view)[0] if failures else ()
    rwnd, sndbuf, snd_wnd = _columns(layout.waits, view) if sum(columns[_BUSY]) else [()] * 3
    for (peer, rows), (rtt_sum, retrans, acked, received, segs_out, busy_us) in zip(
        groups, sums, strict=True
    ):
        size = rows.count(1)
        if not failures:
            peer.closed[OK] += size
        else:
            failed = tuple(compress(segs_in, map(and_, rows, map(not_, delivered))))
            peer.closed[OK] += size - len(failed)
            peer.closed[TIMEOUT] += failed.count(0)
            peer.closed[REFUSED] += len(failed) - failed.count(0)
        if buckets is not None:
            mine = buckets if len(groups) == 1 else bytes(compress(buckets, rows))
            for bucket in set(mine).difference(_NO_RTT_SET):
                peer.rtt[bucket] += mine.count(bucket)
            peer.rtt_count += len(mine) - mine.count(_NO_RTT)
        elif rtt_sum:
            values = tuple(compress(rtt, rows))
            values = tuple(compress(values, values))  # the per-event loop skips RTT 0
            _histogram(peer.rtt, values)
            peer.rtt_count += len(values)
        peer.rtt_sum_us += rtt_sum
        peer.segs_out += segs_out
        peer.retrans += retrans
        peer.bytes_acked += acked
        peer.bytes_received += received
        if busy_us:  # the limited times count only with busy time, as in the per-event loop
            peer.busy_us += busy_us
            busy = tuple(compress(columns[_BUSY], rows))
            waited = tuple(compress(compress(rwnd, rows), busy))
            peer.rwnd_us += sum(waited)
            peer.sndbuf_us += sum(compress(compress(sndbuf, rows), busy))
            windows = compress(compress(snd_wnd, rows), busy)
            peer.zero_window += tuple(compress(windows, waited)).count(0)
        peer.last_seen = now


def _columns(layout: struct.Struct, view: memoryview) -> Columns:
    """Fields rarely needed, by a second unpack of the batch."""
    return list(zip(*layout.iter_unpack(view), strict=True))


def _histogram(histogram: list[int], rtt: tuple[int, ...]) -> None:
    """Add each RTT to bucket ``bisect_left(RTT_BOUNDS_US, rtt)``, as the per-event loop does."""
    first = bisect_left(RTT_BOUNDS_US, min(rtt))
    last = bisect_left(RTT_BOUNDS_US, max(rtt))
    if first == last:
        histogram[first] += len(rtt)
        return
    ordered = sorted(rtt)
    below = 0  # RTTs <= the previous bucket's bound: none below the first
    for bucket in range(first, last + 1):
        upto = bisect_right(ordered, RTT_BOUNDS_US[bucket]) if bucket < last else len(rtt)
        histogram[bucket] += upto - below
        below = upto
