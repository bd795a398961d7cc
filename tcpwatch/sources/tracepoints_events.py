"""The TCP tracepoints the ``tracepoints`` source reads: which, the kernel-side filter of each,
and how a raw record becomes plain values (offsets and enum numbers from tracefs, never fixed).

=========================  =====================================================================
``sock:inet_sock_set_state``  every TCP state change: skaddr, old and new state, 4-tuple. Kept:
                           changes into or out of SYN_SENT (connect), into LISTEN and into CLOSE
                           from a state a followed socket can be in (its end).
``sock:inet_sk_error_report``  the error a socket reports (ECONNREFUSED, ETIMEDOUT ...), 4-tuple.
``tcp:tcp_retransmit_skb``  retransmissions; kept: those of a SYN (state SYN_SENT).
``tcp:tcp_send_reset``      a reset sent, with the kernel's reason (6.10+) and skaddr (0: none).
``tcp:tcp_receive_reset``   a reset received: skaddr, 4-tuple, socket cookie.
``skb:kfree_skb``           a packet dropped, with the reason (5.17+) and the receiving socket
                           (``rx_sk``, 6.10+); kept: the reasons in :data:`DROP_REASONS`.
=========================  =====================================================================

The first two are required; a kernel without one of the others loses only what it gives (the
source is degraded, naming it).
"""

from __future__ import annotations

import mmap
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tcpwatch.sources.tracefs import EventFormat, TracefsError

AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)
IPPROTO_TCP = 6
PAD12 = bytes(12)
# common_flags bits (include/linux/trace_events.h, enum trace_flag_type): a record written in
# interrupt context names whatever task was running, not one that acted on the socket.
TRACE_FLAG_HARDIRQ = 0x08
TRACE_FLAG_SOFTIRQ = 0x10
TRACE_FLAG_NMI = 0x40
INTERRUPT_FLAGS = TRACE_FLAG_HARDIRQ | TRACE_FLAG_SOFTIRQ | TRACE_FLAG_NMI
COMMON = struct.Struct("=HBBi")  # common_type, common_flags, common_preempt_count, common_pid

# Drop reasons worth a series (skb:kfree_skb is also every ordinary discard: NOT_SPECIFIED,
# and NO_SOCKET for UDP to closed ports; a TCP segment to no socket is counted as the reset it
# gets). Names as include/net/dropreason-core.h spells them; this kernel's numbers are read.
DROP_REASONS = (
    "NETFILTER_DROP",
    "SOCKET_FILTER",
    "SOCKET_RCVBUFF",
    "SOCKET_BACKLOG",
    "PROTO_MEM",
    "TCP_CSUM",
    "TCP_LISTEN_OVERFLOW",
    "TCP_ZEROWINDOW",
    "TCP_OVERWINDOW",
    "TCP_OFOMERGE",
    "TCP_OFO_DROP",
    "TCP_OFO_QUEUE_PRUNE",
    "TCP_OLD_DATA",
    "TCP_RFC7323_PAWS",
    "TCP_INVALID_SEQUENCE",
    "TCP_INVALID_ACK_SEQUENCE",
    "TCP_INVALID_SYN",
    "TCP_FLAGS",
    "TCP_MD5FAILURE",
    "TCP_AOFAILURE",
    "TCP_MINTTL",
    "IP_INADDRERRORS",
    "IP_INNOROUTES",
    "IP_RPFILTER",
    "QDISC_DROP",
    "CPU_BACKLOG",
    "NOMEM",
)

SET_STATE = ("sock", "inet_sock_set_state")
ERROR_REPORT = ("sock", "inet_sk_error_report")
RETRANSMIT = ("tcp", "tcp_retransmit_skb")
SEND_RESET = ("tcp", "tcp_send_reset")
RECEIVE_RESET = ("tcp", "tcp_receive_reset")
KFREE_SKB = ("skb", "kfree_skb")
REQUIRED = (SET_STATE, ERROR_REPORT)
OPTIONAL = (RETRANSMIT, SEND_RESET, RECEIVE_RESET, KFREE_SKB)
# Short names, as tcpwatch_tracepoint_records_total{event=...} shows them.
EVENT_NAMES = {
    SET_STATE: "set_state",
    ERROR_REPORT: "error_report",
    RETRANSMIT: "retransmit",
    SEND_RESET: "send_reset",
    RECEIVE_RESET: "receive_reset",
    KFREE_SKB: "drop",
}

# A raw record is read where it lies: in the ring buffer's mapping, or in the copy of one that
# wrapped. Addresses come out as 16 bytes, IPv4 zero-padded, as lifecycle_events.py keeps them.
Buffer = mmap.mmap | bytes
Decoder = Callable[[Buffer, int], tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class TcpStates:
    """The TCP state numbers this kernel uses (from inet_sock_set_state's print fmt)."""

    established: int
    syn_sent: int
    close: int
    listen: int
    syn_recv: int


def tcp_states(event: EventFormat) -> TcpStates:
    return TcpStates(
        established=event.value_of("newstate", "TCP_ESTABLISHED"),
        syn_sent=event.value_of("newstate", "TCP_SYN_SENT"),
        close=event.value_of("newstate", "TCP_CLOSE"),
        listen=event.value_of("newstate", "TCP_LISTEN"),
        syn_recv=event.value_of("newstate", "TCP_SYN_RECV"),
    )


def _tuple_fields() -> tuple[str, ...]:
    return ("sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6")


def _address(family: int, v4: bytes, v6: bytes) -> bytes:
    return v4 + PAD12 if family == AF_INET else v6


# -- filters ----------------------------------------------------------------------------------


def set_state_filter(states: TcpStates) -> str:
    """A connect's start and end, a listener's start, and the end of a socket that may be
    followed (docs/tracepoints.md, "Which records"): no followed socket is ever in CLOSE (each
    is forgotten on entering it) or in SYN_RECV (a SYN_SENT socket moving there, a simultaneous
    open, ends its connect), so the ends from those two states are left in the kernel."""
    s = states
    return (
        f"protocol == {IPPROTO_TCP} && (oldstate == {s.syn_sent} || newstate == {s.syn_sent} "
        f"|| newstate == {s.listen} || (newstate == {s.close} && oldstate != {s.close} "
        f"&& oldstate != {s.syn_recv}))"
    )


def error_report_filter(event: EventFormat) -> str:
    event.field("protocol")
    return f"protocol == {IPPROTO_TCP}"


def retransmit_filter(states: TcpStates) -> str:
    return f"state == {states.syn_sent}"


def drop_filter(event: EventFormat) -> tuple[str, dict[int, str]]:
    """The kfree_skb filter on this kernel's numbers for DROP_REASONS, and number -> name."""
    event.field("reason")
    wanted: dict[int, str] = {}
    for name in DROP_REASONS:
        try:
            wanted[event.value_of("reason", name)] = name
        except TracefsError:
            continue  # a reason this kernel does not have
    if not wanted:
        raise TracefsError(f"{event.title}: none of the drop reasons is known to this kernel")
    return " || ".join(f"reason == {number}" for number in sorted(wanted)), wanted


# -- decoders: raw record at ``offset`` of ``buffer`` -> plain values --------------------------


def set_state_decoder(event: EventFormat) -> Decoder:
    """(skaddr, oldstate, newstate, family, sport, dport, source, destination)."""
    unpack = event.unpacker(("skaddr", "oldstate", "newstate", *_tuple_fields())).unpack_from

    def decode(buffer: Buffer, offset: int) -> tuple[Any, ...]:
        sk, old, new, sport, dport, family, saddr, daddr, saddr6, daddr6 = unpack(buffer, offset)
        if family == AF_INET:
            return sk, old, new, family, sport, dport, saddr + PAD12, daddr + PAD12
        return sk, old, new, family, sport, dport, saddr6, daddr6

    return decode


def error_report_decoder(event: EventFormat) -> Decoder:
    """(error, family, sport, dport, source, destination)."""
    unpack = event.unpacker(("error", *_tuple_fields())).unpack_from

    def decode(buffer: Buffer, offset: int) -> tuple[Any, ...]:
        error, sport, dport, family, saddr, daddr, saddr6, daddr6 = unpack(buffer, offset)
        if family == AF_INET:
            return error, family, sport, dport, saddr + PAD12, daddr + PAD12
        return error, family, sport, dport, saddr6, daddr6

    return decode


def retransmit_decoder(event: EventFormat) -> Decoder:
    """(skaddr,)."""
    unpack = event.unpacker(("skaddr",)).unpack_from
    return unpack


def receive_reset_decoder(event: EventFormat) -> Decoder:
    """(skaddr, family, sport, dport, source, destination)."""
    unpack = event.unpacker(("skaddr", *_tuple_fields())).unpack_from

    def decode(buffer: Buffer, offset: int) -> tuple[Any, ...]:
        sk, sport, dport, family, saddr, daddr, saddr6, daddr6 = unpack(buffer, offset)
        if family == AF_INET:
            return sk, family, sport, dport, saddr + PAD12, daddr + PAD12
        return sk, family, sport, dport, saddr6, daddr6

    return decode


_SOCKADDR = struct.Struct("=H")  # sa_family; then the port (network order) and the address


def sockaddr_endpoint(raw: bytes) -> tuple[int, int, bytes]:
    """(family, port, 16-byte address) of a sockaddr_in or sockaddr_in6 held in ``raw``."""
    family = _SOCKADDR.unpack_from(raw)[0]
    port = int.from_bytes(raw[2:4], "big")
    if family == AF_INET:
        return family, port, raw[4:8] + PAD12
    if family == AF_INET6:
        return family, port, raw[8:24]
    return family, 0, bytes(16)


def send_reset_decoder(
    event: EventFormat,
) -> tuple[Decoder, dict[int, str]]:
    """(skaddr, reason number, family, sport, dport, source, destination), and number -> name.

    6.10+ records the reason and the addresses as sockaddrs (saddr[28], daddr[28]); older
    kernels record sport/dport/family and the addresses apart, and no reason (number -1).
    """
    reasons = dict(event.symbols.get("reason", {}))
    if "reason" in event.fields and event.field("saddr").size >= 16:
        unpack = event.unpacker(("skaddr", "reason", "saddr", "daddr")).unpack_from

        def decode(buffer: Buffer, offset: int) -> tuple[Any, ...]:
            sk, reason, saddr, daddr = unpack(buffer, offset)
            family, sport, source = sockaddr_endpoint(saddr)
            _, dport, destination = sockaddr_endpoint(daddr)
            return sk, reason, family, sport, dport, source, destination

        return decode, reasons
    unpack_old = event.unpacker(("skaddr", *_tuple_fields())).unpack_from

    def decode_old(buffer: Buffer, offset: int) -> tuple[Any, ...]:
        sk, sport, dport, family, saddr, daddr, saddr6, daddr6 = unpack_old(buffer, offset)
        source = _address(family, saddr, saddr6)
        destination = _address(family, daddr, daddr6)
        return sk, -1, family, sport, dport, source, destination

    return decode_old, reasons


def drop_decoder(event: EventFormat) -> Decoder:
    """(rx_sk, reason number); rx_sk is 0 on kernels before 6.10 (no field)."""
    if "rx_sk" in event.fields:
        unpack = event.unpacker(("rx_sk", "reason")).unpack_from
        return unpack
    only_reason = event.unpacker(("reason",)).unpack_from

    def decode(buffer: Buffer, offset: int) -> tuple[Any, ...]:
        return (0, only_reason(buffer, offset)[0])

    return decode
