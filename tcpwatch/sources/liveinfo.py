"""A live connection's slowness, read from one sock_diag message in one struct call.

Both live scans (the per-destination scan, sockdiag.py; the listeners' connections, inbound.py)
dump ESTABLISHED sockets asking for ``INET_DIAG_SKMEMINFO`` and ``INET_DIAG_INFO``. The kernel
writes the attributes of every socket of one dump in one order (inet_sk_diag_fill(): the
common ones, then SKMEMINFO, then INFO), so all messages of one length share one layout: the
first message of a length is walked, a ``struct.Struct`` is compiled for that layout, and every
later message of the length is one ``unpack_from`` whose INFO attribute header is checked in the
result (a message that does not match is walked again).

A row (:data:`ROW`, one tuple per connection) holds, in message order::

    timer          idiag_timer: 4 = the zero-window probe ("persist") timer is armed
    sport          local port, as a native-endian read of the big-endian field (ntohs() it)
    rqueue         Recv-Q: bytes received and not yet read by the application
    wqueue         Send-Q: bytes written and not yet acknowledged
    inode          the socket's inode (who owns it: /proc/PID/fd)
    rmem_alloc, rcvbuf, sndbuf, drops    SKMEMINFO r, rb, tb, d (`ss -m` skmem:(...))
    info_attr      INFO's netlink attribute header as one u32: the layout check
    retrans .. total_rto_time            tcp_info fields (tcpinfo.py), see :data:`INFO_FIELDS`

A field the kernel did not send (an older kernel's shorter tcp_info, no SKMEMINFO) reads 0 in
the row; :class:`RowReader` remembers the shortest tcp_info and whether SKMEMINFO came, so the
summary says None rather than 0 for what was never reported.
"""

from __future__ import annotations

import heapq
import socket
import struct
from collections.abc import Callable, Sequence

from tcpwatch.endpoints import endpoint
from tcpwatch.sources.netlink import (
    INET_DIAG_INFO,
    INET_DIAG_SKMEMINFO,
    NLATTR,
    SK_MEMINFO_DROPS,
    find_attribute,
)
from tcpwatch.sources.tcpinfo import field_end, field_layout
from tcpwatch.stalls import LiveConnection, Stalls

ATTRIBUTES_AT = 88  # the first attribute of an inet_diag message (sockdiag.INET_DIAG_MSG_MIN)
TIMER_PERSIST = 4  # idiag_timer of a socket whose zero-window probe timer is pending

HEADER_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("timer", 18, "B"),
    ("sport", 20, "H"),
    ("rqueue", 72, "I"),
    ("wqueue", 76, "I"),
    ("inode", 84, "I"),
)
# SKMEMINFO: u32 sk_meminfo[] indices (include/uapi/linux/sock_diag.h SK_MEMINFO_*).
SKMEM_FIELDS: tuple[tuple[str, int], ...] = (
    ("rmem_alloc", 0),
    ("rcvbuf", 1),
    ("sndbuf", 3),
    ("drops", SK_MEMINFO_DROPS),
)
SKMEM_LENGTH = (SK_MEMINFO_DROPS + 1) * 4
# tcp_info fields, in offset order (the row keeps message order).
INFO_FIELDS: tuple[str, ...] = (
    "retrans",
    "rtt",
    "total_retrans",
    "segs_out",
    "min_rtt",
    "delivery_rate",
    "busy_time",
    "rwnd_limited",
    "sndbuf_limited",
    "snd_wnd",
    "total_rto_recoveries",
    "total_rto_time",
)
ROW: tuple[str, ...] = (
    *(name for name, _, _ in HEADER_FIELDS),
    *(name for name, _ in SKMEM_FIELDS),
    "info_attr",
    *INFO_FIELDS,
)
COLUMN = {name: index for index, name in enumerate(ROW)}
TIMER, SPORT, RQUEUE, WQUEUE, INODE = (
    COLUMN[n] for n in ("timer", "sport", "rqueue", "wqueue", "inode")
)
RMEM, RCVBUF, SNDBUF, DROPS, INFO_ATTR = (
    COLUMN[n] for n in ("rmem_alloc", "rcvbuf", "sndbuf", "drops", "info_attr")
)
RETRANS, RTT, TOTAL_RETRANS, SEGS_OUT, MIN_RTT, DELIVERY_RATE = (
    COLUMN[n] for n in ("retrans", "rtt", "total_retrans", "segs_out", "min_rtt", "delivery_rate")
)
BUSY, RWND_LIMITED, SNDBUF_LIMITED, SND_WND, RTO_RECOVERIES, RTO_TIME = (
    COLUMN[n]
    for n in (
        "busy_time",
        "rwnd_limited",
        "sndbuf_limited",
        "snd_wnd",
        "total_rto_recoveries",
        "total_rto_time",
    )
)
_INFO_LAYOUT = field_layout(INFO_FIELDS)
_ATTR_WORD = struct.Struct("=I")
# The smallest tcp_info a row can be made from: up to total_retrans (every kernel since 2.6).
MIN_INFO_LENGTH = field_end("total_retrans")
WORST = 5  # connections kept per peer as evidence

Row = tuple[int, ...]
Unpack = Callable[[bytes | memoryview, int], Row]


def attribute_word(length: int, kind: int) -> int:
    """A netlink attribute header (u16 length, u16 type) read as one native u32."""
    value: int = _ATTR_WORD.unpack(NLATTR.pack(length, kind))[0]
    return value


def _compile(skmem_at: int | None, info_at: int, info_length: int) -> tuple[struct.Struct, bool]:
    """The Struct reading a row from a message whose SKMEMINFO payload starts at ``skmem_at``
    and INFO payload at ``info_at`` (offsets in the message), and whether it reads every field
    (False: some are missing and the row must be padded)."""
    pieces: list[tuple[int, str]] = [(offset, code) for _, offset, code in HEADER_FIELDS]
    complete = True
    if skmem_at is not None:
        pieces += [(skmem_at + 4 * index, "I") for _, index in SKMEM_FIELDS]
    else:
        complete = False
    pieces.append((info_at - 4, "I"))
    for _, offset, code in _INFO_LAYOUT:
        if offset + struct.calcsize("=" + code) <= info_length:
            pieces.append((info_at + offset, code))
        else:
            complete = False
    layout = "="
    position = 0
    for offset, code in pieces:
        layout += f"{offset - position}x{code}" if offset > position else code
        position = offset + struct.calcsize("=" + code)
    return struct.Struct(layout), complete


class RowReader:
    """Reads rows, compiling one Struct per message length (see the module docstring).

    ``layouts`` maps a message length to (unpack_from, expected info_attr); a caller's hot loop
    may use it directly and call :meth:`read` when the length is new or the check fails.
    """

    def __init__(self) -> None:
        self.layouts: dict[int, tuple[Unpack, int]] = {}
        self.info_length = 0  # the shortest tcp_info seen (0: none yet)
        self.skmem = True  # every row so far had SKMEMINFO
        self.rows = 0

    def read(self, data: bytes | memoryview, offset: int, msg_len: int) -> Row | None:
        """The row of the message at ``offset`` (None: it has no usable tcp_info)."""
        end = offset + msg_len
        start = offset + ATTRIBUTES_AT
        info = find_attribute(data, start, end, INET_DIAG_INFO)
        if info is None or info[1] < MIN_INFO_LENGTH:
            return None
        info_at, info_length = info[0] - offset, info[1]
        skmem = find_attribute(data, start, end, INET_DIAG_SKMEMINFO)
        skmem_at = None
        if skmem is not None and skmem[1] >= SKMEM_LENGTH and skmem[0] - offset < info_at:
            skmem_at = skmem[0] - offset
        layout, complete = _compile(skmem_at, info_at, info_length)
        expected = attribute_word(info_length + 4, INET_DIAG_INFO)
        self.info_length = min(self.info_length or info_length, info_length)
        self.skmem = self.skmem and skmem_at is not None
        if complete:
            self.layouts[msg_len] = (layout.unpack_from, expected)
            row: Row = layout.unpack_from(data, offset)
            return row
        self.layouts.pop(msg_len, None)  # a padded row is built here every time
        return _padded(layout.unpack_from(data, offset), skmem_at is not None, info_length)

    def known(self, field: str) -> bool:
        """Whether every row read so far carried ``field`` (a tcp_info field or SKMEMINFO's)."""
        if field in dict(SKMEM_FIELDS):
            return self.skmem
        return self.info_length >= field_end(field)


def _padded(values: Row, skmem: bool, info_length: int) -> Row:
    """A full row from what a partial layout read: missing fields are 0."""
    items = list(values)
    row: list[int] = items[: len(HEADER_FIELDS)]
    rest = items[len(HEADER_FIELDS) :]
    if skmem:
        row += rest[: len(SKMEM_FIELDS)]
        rest = rest[len(SKMEM_FIELDS) :]
    else:
        row += [0] * len(SKMEM_FIELDS)
    row.append(rest[0])  # info_attr
    present = iter(rest[1:])
    for _, offset, code in _INFO_LAYOUT:
        fits = offset + struct.calcsize("=" + code) <= info_length
        row.append(next(present) if fits else 0)
    return tuple(row)


def _seconds(microseconds: int) -> float:
    return microseconds / 1e6


def connection(
    row: Row, reader: RowReader, local: str, remote: str, source_port: bool = True
) -> LiveConnection:
    """One row as a LiveConnection. ``local`` gets the row's port appended unless
    ``source_port`` is False (it already has one)."""
    known = reader.known
    port = socket.ntohs(row[SPORT])
    host = endpoint(local, port) if source_port else local
    return LiveConnection(
        local=host,
        remote=remote,
        inode=row[INODE],
        receive_queue=row[RQUEUE],
        send_queue=row[WQUEUE],
        zero_window=row[TIMER] == TIMER_PERSIST,
        receive_memory=row[RMEM] if reader.skmem else None,
        receive_buffer=row[RCVBUF] if reader.skmem else None,
        send_buffer=row[SNDBUF] if reader.skmem else None,
        drops=row[DROPS] if reader.skmem else None,
        peer_window=row[SND_WND] if known("snd_wnd") else None,
        busy_seconds=_seconds(row[BUSY]) if known("busy_time") else None,
        rwnd_limited_seconds=_seconds(row[RWND_LIMITED]) if known("rwnd_limited") else None,
        sndbuf_limited_seconds=(_seconds(row[SNDBUF_LIMITED]) if known("sndbuf_limited") else None),
        rtt_seconds=_seconds(row[RTT]),
        min_rtt_seconds=_seconds(row[MIN_RTT]) if known("min_rtt") else None,
        delivery_rate=row[DELIVERY_RATE] if known("delivery_rate") else None,
        retransmitted=row[TOTAL_RETRANS],
        rto_recoveries=row[RTO_RECOVERIES] if known("total_rto_recoveries") else None,
    )


def _positive_argmax(column: Sequence[int]) -> int | None:
    """Index of the largest value when it is above 0 (C-speed: max() then index())."""
    top = max(column)
    return column.index(top) if top > 0 else None


def worst_indices(
    columns: Sequence[Sequence[int]], limit: int = WORST, leaders: int = 1
) -> list[int]:
    """Rows that show the most, in this order: the ``leaders`` longest waits on the peer's
    window, a closed window now, the fullest receive queue, the longest wait on the send
    buffer, the most drops, the fullest send queue, the most retransmissions; each only when
    above 0."""
    chosen: list[int] = []
    timers = columns[TIMER]
    rwnd = columns[RWND_LIMITED]
    if leaders > 1:
        top = heapq.nlargest(leaders, range(len(rwnd)), key=rwnd.__getitem__)
        chosen = [index for index in top if rwnd[index] > 0]
    candidates = (
        _positive_argmax(rwnd),
        timers.index(TIMER_PERSIST) if TIMER_PERSIST in timers else None,
        _positive_argmax(columns[RQUEUE]),
        _positive_argmax(columns[SNDBUF_LIMITED]),
        _positive_argmax(columns[DROPS]),
        _positive_argmax(columns[WQUEUE]),
        _positive_argmax(columns[TOTAL_RETRANS]),
    )
    for index in candidates:
        if index is not None and index not in chosen:
            chosen.append(index)
    return chosen[:limit]


def stalls(
    columns: Sequence[Sequence[int]],
    reader: RowReader,
    worst: Sequence[LiveConnection] = (),
) -> Stalls:
    """The summary of one peer's rows, given as columns (``zip(*rows)``: sums run in C)."""
    known = reader.known
    rqueue, wqueue, rmem, rcvbuf = columns[RQUEUE], columns[WQUEUE], columns[RMEM], columns[RCVBUF]
    receive_max = max(rqueue)
    full = 0
    if receive_max and reader.skmem:
        full = sum(
            1
            for r, memory, size in zip(rqueue, rmem, rcvbuf, strict=True)
            if r and 2 * memory >= size
        )
    return Stalls(
        connections=len(rqueue),
        busy_seconds=_seconds(sum(columns[BUSY])) if known("busy_time") else None,
        rwnd_limited_seconds=(
            _seconds(sum(columns[RWND_LIMITED])) if known("rwnd_limited") else None
        ),
        sndbuf_limited_seconds=(
            _seconds(sum(columns[SNDBUF_LIMITED])) if known("sndbuf_limited") else None
        ),
        send_queue_bytes=sum(wqueue),
        send_queue_max_bytes=max(wqueue),
        receive_queue_bytes=sum(rqueue),
        receive_queue_max_bytes=receive_max,
        zero_window=columns[TIMER].count(TIMER_PERSIST),
        receive_full=full,
        drops=sum(columns[DROPS]) if reader.skmem else None,
        retransmits_in_flight=sum(columns[RETRANS]),
        rto_recoveries=(sum(columns[RTO_RECOVERIES]) if known("total_rto_recoveries") else None),
        rto_seconds=(
            sum(columns[RTO_TIME]) / 1000 if known("total_rto_time") else None
        ),  # milliseconds in the kernel
        rwnd_limited_connections=len(rqueue) - columns[RWND_LIMITED].count(0),
        sndbuf_limited_connections=len(rqueue) - columns[SNDBUF_LIMITED].count(0),
        segments_sent=sum(columns[SEGS_OUT]),
        segments_retransmitted=sum(columns[TOTAL_RETRANS]),
        worst=tuple(worst),
    )
