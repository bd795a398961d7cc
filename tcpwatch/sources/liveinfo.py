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

A scan does not unpack its messages one by one: :class:`Layout` reads a field over many
messages of one layout at once (livesums.py sums them per peer).
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tcpwatch.endpoints import endpoint
from tcpwatch.sources.netlink import (
    INET_DIAG_INFO,
    INET_DIAG_SKMEMINFO,
    NLATTR,
    SK_MEMINFO_DROPS,
    find_attribute,
)
from tcpwatch.sources.tcpinfo import field_end, field_layout
from tcpwatch.stalls import LiveConnection

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
    "dsack_dups",
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
_LITTLE = sys.byteorder == "little"
_ENDS = struct.Struct("!HH16s16s")  # sport, dport, src[16], dst[16] at byte 20

Row = tuple[int, ...]
# A field over many messages: ints, bytes (a one-byte field), or None (0 in every message).
Columns = dict[str, list[int] | bytes | None]
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

    :attr:`by_length` keeps the :class:`Layout` of each message length seen.
    """

    def __init__(self) -> None:
        self.by_length: dict[int, Layout] = {}
        self.info_length = 0  # the shortest tcp_info seen (0: none yet)
        self.skmem = True  # every row so far had SKMEMINFO
        self.rows = 0

    def layout(self, data: bytes | memoryview, offset: int, msg_len: int) -> Layout | None:
        """The layout of the message at ``offset``, from its attributes (None: no usable
        tcp_info); remembered per length, as :attr:`by_length`."""
        known = self.by_length.get(msg_len)
        if known is not None and known.matches(data, offset):
            return known
        if self.read(data, offset, msg_len) is None:
            return None
        return self.by_length.get(msg_len)

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
        self.by_length[msg_len] = Layout(
            msg_len,
            layout,
            complete,
            skmem_at is not None,
            info_length,
            expected,
            _field_offsets(skmem_at, info_at, info_length),
        )
        if complete:
            row: Row = layout.unpack_from(data, offset)
            return row
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


def seconds(microseconds: int) -> float:
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
        busy_seconds=seconds(row[BUSY]) if known("busy_time") else None,
        rwnd_limited_seconds=seconds(row[RWND_LIMITED]) if known("rwnd_limited") else None,
        sndbuf_limited_seconds=(seconds(row[SNDBUF_LIMITED]) if known("sndbuf_limited") else None),
        rtt_seconds=seconds(row[RTT]),
        min_rtt_seconds=seconds(row[MIN_RTT]) if known("min_rtt") else None,
        delivery_rate=row[DELIVERY_RATE] if known("delivery_rate") else None,
        retransmitted=row[TOTAL_RETRANS],
        rto_recoveries=row[RTO_RECOVERIES] if known("total_rto_recoveries") else None,
    )


def _field_offsets(
    skmem_at: int | None, info_at: int, info_length: int
) -> dict[str, tuple[int, str]]:
    """Row field -> (offset in the message, struct code), for the fields the message holds."""
    fields = {name: (offset, code) for name, offset, code in HEADER_FIELDS}
    if skmem_at is not None:
        fields.update((name, (skmem_at + 4 * index, "I")) for name, index in SKMEM_FIELDS)
    fields["info_attr"] = (info_at - 4, "I")
    for name, offset, code in _INFO_LAYOUT:
        if offset + struct.calcsize("=" + code) <= info_length:
            fields[name] = (info_at + offset, code)
    return fields


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a row's fields sit in the messages of one length (one attribute arrangement)."""

    size: int  # the message length
    compiled: struct.Struct  # one message -> its fields present, in row order
    complete: bool  # every row field is present (else rows are padded with 0)
    skmem: bool  # the messages carry SKMEMINFO
    info_length: int  # bytes of tcp_info they carry
    expected: int  # the INFO attribute's header word, the check that a message has this layout
    fields: dict[str, tuple[int, str]]  # row field -> (offset, struct code), present ones only

    def matches(self, data: bytes | memoryview, offset: int) -> bool:
        at = self.fields["info_attr"][0]
        word: int = _ATTR_WORD.unpack_from(data, offset + at)[0]
        return word == self.expected

    def row(self, record: bytes | memoryview) -> Row:
        """One message's row (missing fields 0)."""
        values: Row = self.compiled.unpack_from(record, 0)
        return values if self.complete else _padded(values, self.skmem, self.info_length)

    def columns(self, buffer: bytes, names: Sequence[str]) -> Columns | None:
        """Each named field over every message in ``buffer`` (a whole number of messages), read
        with strided memoryviews in C: a list of ints, bytes for a one-byte field, or None when
        the field is 0 in every message (the common case, found without building any int); the
        whole result is None when the layout's offsets are not aligned for that (the caller
        then reads message by message). A field the messages lack is left out."""
        size = self.size
        if size % 4:
            return None
        view = memoryview(buffer)
        words = view.cast("I")
        halves = view.cast("H")
        stride = size // 4
        out: Columns = {}
        for name in names:
            found = self.fields.get(name)
            if found is None:
                continue
            offset, code = found
            if code == "B":
                out[name] = view[offset::size].tobytes()
                continue
            if code == "H":
                if offset % 2:
                    return None
                column = halves[offset // 2 :: size // 2]
            elif offset % 4:
                return None
            elif code == "Q":  # two words, the low one first on little-endian machines
                first, second = words[offset // 4 :: stride], words[offset // 4 + 1 :: stride]
                column, high = (first, second) if _LITTLE else (second, first)
                high_raw = high.tobytes()
                if high_raw.count(0) != len(high_raw):
                    pairs = zip(column.tolist(), high.tolist(), strict=True)
                    out[name] = [low + (top << 32) for low, top in pairs]
                    continue
            else:
                column = words[offset // 4 :: stride]
            raw = column.tobytes()
            out[name] = None if raw.count(0) == len(raw) else column.tolist()
        return out

    def uniform(self, buffer: bytes) -> bool:
        """Whether every message in ``buffer`` has this layout's INFO header where expected."""
        offset = self.fields["info_attr"][0]
        if self.size % 4 or offset % 4:
            return False
        column = memoryview(buffer).cast("I")[offset // 4 :: self.size // 4].tobytes()
        return column == _ATTR_WORD.pack(self.expected) * (len(buffer) // self.size)


def endpoints_of(record: bytes | memoryview, family: str) -> tuple[str, str]:
    """(local, remote) endpoints of one inet_diag message, as ``ss`` writes them."""
    sport, dport, source, destination = _ENDS.unpack_from(record, 20)
    number = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    length = 4 if family == "ipv4" else 16
    return (
        endpoint(socket.inet_ntop(number, source[:length]), sport),
        endpoint(socket.inet_ntop(number, destination[:length]), dport),
    )
