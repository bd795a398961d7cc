"""``struct tcp_info`` (include/uapi/linux/tcp.h), parsed by length with plain ``struct``.

The kernel copies ``min(sizeof(struct tcp_info), room)`` bytes, and the struct has only grown at
its end, so an older kernel sends a shorter prefix of the same layout (:data:`SINCE`: the length
each kernel release reached). A field the prefix does not reach is ``None`` in :class:`TcpInfo`,
never a made-up 0.

Offsets (6.18)::

      0 state u8 | 1 ca_state u8 | 2 retransmits u8 | 3 probes u8 | 4 backoff u8 | 5 options u8
      6 snd_wscale:4 rcv_wscale:4 | 7 flags | 8 rto | 12 ato | 16 snd_mss | 20 rcv_mss
     24 unacked | 28 sacked | 32 lost | 36 retrans | 40 fackets | 44..56 last_* (ms ago)
     60 pmtu | 64 rcv_ssthresh | 68 rtt (us) | 72 rttvar (us) | 76 snd_ssthresh | 80 snd_cwnd
     84 advmss | 88 reordering | 92 rcv_rtt | 96 rcv_space | 100 total_retrans
    104 pacing_rate u64 | 112 max_pacing_rate u64 | 120 bytes_acked u64 | 128 bytes_received u64
    136 segs_out | 140 segs_in | 144 notsent_bytes | 148 min_rtt | 152 data_segs_in
    156 data_segs_out | 160 delivery_rate u64 | 168 busy_time u64 | 176 rwnd_limited u64
    184 sndbuf_limited u64 | 192 delivered | 196 delivered_ce | 200 bytes_sent u64
    208 bytes_retrans u64 | 216 dsack_dups | 220 reord_seen | 224 rcv_ooopack | 228 snd_wnd
    232 rcv_wnd | 236 rehash | 240 total_rto u16 | 242 total_rto_recoveries u16
    244 total_rto_time | 248 .. 280 AccECN counters (not parsed)
"""

from __future__ import annotations

import bisect
import struct
import sys
from dataclasses import dataclass

from tcpwatch.sources.netlink import SockDiagError

# (name, offset, struct code), in offset order. Every field is native-endian (host byte order).
_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("state", 0, "B"),
    ("ca_state", 1, "B"),
    ("retransmits", 2, "B"),
    ("probes", 3, "B"),
    ("backoff", 4, "B"),
    ("options", 5, "B"),
    ("wscale", 6, "B"),
    ("rto", 8, "I"),
    ("ato", 12, "I"),
    ("snd_mss", 16, "I"),
    ("rcv_mss", 20, "I"),
    ("unacked", 24, "I"),
    ("sacked", 28, "I"),
    ("lost", 32, "I"),
    ("retrans", 36, "I"),
    ("fackets", 40, "I"),
    ("last_data_sent", 44, "I"),
    ("last_ack_sent", 48, "I"),
    ("last_data_recv", 52, "I"),
    ("last_ack_recv", 56, "I"),
    ("pmtu", 60, "I"),
    ("rcv_ssthresh", 64, "I"),
    ("rtt", 68, "I"),
    ("rttvar", 72, "I"),
    ("snd_ssthresh", 76, "I"),
    ("snd_cwnd", 80, "I"),
    ("advmss", 84, "I"),
    ("reordering", 88, "I"),
    ("rcv_rtt", 92, "I"),
    ("rcv_space", 96, "I"),
    ("total_retrans", 100, "I"),
    ("pacing_rate", 104, "Q"),
    ("max_pacing_rate", 112, "Q"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("segs_out", 136, "I"),
    ("segs_in", 140, "I"),
    ("notsent_bytes", 144, "I"),
    ("min_rtt", 148, "I"),
    ("data_segs_in", 152, "I"),
    ("data_segs_out", 156, "I"),
    ("delivery_rate", 160, "Q"),
    ("busy_time", 168, "Q"),
    ("rwnd_limited", 176, "Q"),
    ("sndbuf_limited", 184, "Q"),
    ("delivered", 192, "I"),
    ("delivered_ce", 196, "I"),
    ("bytes_sent", 200, "Q"),
    ("bytes_retrans", 208, "Q"),
    ("dsack_dups", 216, "I"),
    ("reord_seen", 220, "I"),
    ("rcv_ooopack", 224, "I"),
    ("snd_wnd", 228, "I"),
    ("rcv_wnd", 232, "I"),
    ("rehash", 236, "I"),
    ("total_rto", 240, "H"),
    ("total_rto_recoveries", 242, "H"),
    ("total_rto_time", 244, "I"),
)
# The first kernel release whose tcp_info reaches each length: (bytes, release, fields it added).
# From the history of include/uapi/linux/tcp.h (each commit's date against the merge window it
# landed in), and checked at both ends here: Debian's 6.1 header (linux-libc-dev) ends at
# tcpi_snd_wnd, 232 bytes, and Linux 6.18 sends 280.
SINCE: tuple[tuple[int, str, str], ...] = (
    (104, "2.6", "up to total_retrans"),
    (120, "3.15", "pacing_rate, max_pacing_rate"),
    (136, "4.1", "bytes_acked, bytes_received"),
    (144, "4.2", "segs_out, segs_in"),
    (160, "4.6", "notsent_bytes, min_rtt, data_segs_in, data_segs_out"),
    (168, "4.9", "delivery_rate"),
    (192, "4.10", "busy_time, rwnd_limited, sndbuf_limited"),
    (200, "4.18", "delivered, delivered_ce"),
    (224, "4.19", "bytes_sent, bytes_retrans, dsack_dups, reord_seen"),
    (232, "5.4", "rcv_ooopack, snd_wnd"),
    (240, "6.5", "rcv_wnd, rehash"),
    (248, "6.7", "total_rto, total_rto_recoveries, total_rto_time"),
)
_LITTLE = sys.byteorder == "little"
FULL_LENGTH = 280  # sizeof(struct tcp_info) on 6.18
PARSED_LENGTH = 248  # the fields above end here; the AccECN counters after it are not parsed


def _prefix_structs() -> tuple[tuple[int, ...], tuple[tuple[struct.Struct, int], ...]]:
    """One precompiled Struct per prefix of _FIELDS: (ends, (struct, fields it yields))."""
    ends: list[int] = []
    structs: list[tuple[struct.Struct, int]] = []
    layout = "="
    position = 0
    for count, (_, offset, code) in enumerate(_FIELDS, start=1):
        layout += f"{offset - position}x{code}" if offset > position else code
        position = offset + struct.calcsize("=" + code)
        ends.append(position)
        structs.append((struct.Struct(layout), count))
    return tuple(ends), tuple(structs)


_PREFIX_ENDS, _PREFIX_STRUCTS = _prefix_structs()

# The few fields a closed connection is classified and counted by, in one unpack (kernels >= 4.18):
# rtt, total_retrans, bytes_acked, bytes_received, segs_out, segs_in, busy_time, rwnd_limited,
# sndbuf_limited, delivered. SND_WND (the peer's last window, 5.4+) is read apart, only for a
# connection that waited on that window.
CLOSE_FIELDS = struct.Struct("=68xI28xI16xQQII24xQQQI")
# What survives tcp_disconnect and tells whether a handshake completed (measured on 6.18): the
# smallest RTT sample (~0U until an ACK gave one; 4.10+) and the peer's window (0 until a SYN-ACK
# gave one; 5.4+). Read only for events whose port the kernel cleared: not the hot path.
_MIN_RTT = struct.Struct("=148xI")
SND_WND = struct.Struct("=228xI")
NO_RTT_SAMPLE = 0xFFFFFFFF


def handshake_completed(data: bytes | memoryview, start: int, size: int) -> bool:
    """Whether the tcp_info at ``data[start:start+size]`` is that of a connection that was
    established once, even after tcp_disconnect cleared its port and counters."""
    if size >= SND_WND.size and SND_WND.unpack_from(data, start)[0] > 0:
        return True
    if size >= _MIN_RTT.size:
        min_rtt: int = _MIN_RTT.unpack_from(data, start)[0]
        return min_rtt not in (0, NO_RTT_SAMPLE)
    return False


def was_established(info: TcpInfo) -> bool:
    """:func:`handshake_completed` on a parsed tcp_info."""
    if info.snd_wnd:
        return True
    return info.min_rtt not in (None, 0, NO_RTT_SAMPLE)


# The fields a live connection is summarised by: retrans (in flight), rtt, total_retrans.
LIVE_FIELDS = struct.Struct("=36xI28xI28xI")


def field_layout(names: tuple[str, ...]) -> tuple[tuple[str, int, str], ...]:
    """(name, offset, struct code) of each named field, in the order asked (KeyError: unknown).

    >>> field_layout(("rwnd_limited", "rtt"))
    (('rwnd_limited', 176, 'Q'), ('rtt', 68, 'I'))
    """
    known = {name: (name, offset, code) for name, offset, code in _FIELDS}
    return tuple(known[name] for name in names)


def field_end(name: str) -> int:
    """The tcp_info length that holds ``name``: a shorter struct (an older kernel) lacks it.

    >>> field_end("rwnd_limited"), field_end("total_rto_time")
    (184, 248)
    """
    ((_, offset, code),) = field_layout((name,))
    return offset + struct.calcsize("=" + code)


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """One ``struct tcp_info``; a field the kernel's (shorter) struct lacks is None.

    Units as the kernel gives them: times in microseconds (rto, ato, rtt, rttvar, rcv_rtt,
    min_rtt, busy_time, *_limited), the ``last_*`` ages in milliseconds, total_rto_time in ms,
    rates in bytes per second, windows and counters in bytes or segments as named.
    """

    length: int  # bytes the kernel sent
    state: int | None = None
    ca_state: int | None = None
    retransmits: int | None = None
    probes: int | None = None
    backoff: int | None = None
    options: int | None = None
    snd_wscale: int | None = None
    rcv_wscale: int | None = None
    rto: int | None = None
    ato: int | None = None
    snd_mss: int | None = None
    rcv_mss: int | None = None
    unacked: int | None = None
    sacked: int | None = None
    lost: int | None = None
    retrans: int | None = None
    fackets: int | None = None
    last_data_sent: int | None = None
    last_ack_sent: int | None = None
    last_data_recv: int | None = None
    last_ack_recv: int | None = None
    pmtu: int | None = None
    rcv_ssthresh: int | None = None
    rtt: int | None = None
    rttvar: int | None = None
    snd_ssthresh: int | None = None
    snd_cwnd: int | None = None
    advmss: int | None = None
    reordering: int | None = None
    rcv_rtt: int | None = None
    rcv_space: int | None = None
    total_retrans: int | None = None
    pacing_rate: int | None = None
    max_pacing_rate: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    segs_out: int | None = None
    segs_in: int | None = None
    notsent_bytes: int | None = None
    min_rtt: int | None = None
    data_segs_in: int | None = None
    data_segs_out: int | None = None
    delivery_rate: int | None = None
    busy_time: int | None = None
    rwnd_limited: int | None = None
    sndbuf_limited: int | None = None
    delivered: int | None = None
    delivered_ce: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None
    dsack_dups: int | None = None
    reord_seen: int | None = None
    rcv_ooopack: int | None = None
    snd_wnd: int | None = None
    rcv_wnd: int | None = None
    rehash: int | None = None
    total_rto: int | None = None
    total_rto_recoveries: int | None = None
    total_rto_time: int | None = None


def parse_tcp_info(data: bytes | memoryview) -> TcpInfo:
    """Parse a ``struct tcp_info`` of any length the kernel sends (see the module docstring).

    >>> parse_tcp_info(bytes(280)).delivered
    0
    >>> parse_tcp_info(bytes(104)).delivered is None
    True
    """
    length = len(data)
    present = bisect.bisect_right(_PREFIX_ENDS, length)
    if present == 0:
        return TcpInfo(length=0)
    layout, count = _PREFIX_STRUCTS[present - 1]
    try:
        values = layout.unpack_from(data, 0)
    except struct.error as error:  # unreachable: the prefix fits by construction
        raise SockDiagError(f"tcp_info of {length} bytes: {error}") from error
    fields = {name: value for (name, _, _), value in zip(_FIELDS[:count], values, strict=True)}
    wscale = fields.pop("wscale", None)
    if wscale is not None:
        # The first of two 4-bit bit-fields takes the low nibble on little-endian ABIs.
        low, high = wscale & 0x0F, wscale >> 4
        fields["snd_wscale"], fields["rcv_wscale"] = (low, high) if _LITTLE else (high, low)
    return TcpInfo(length=length, **fields)
