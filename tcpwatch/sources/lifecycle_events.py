"""TCP destroy events: the message layout, parsing, and classification of one event.

The messages arrive on the socket-destroy multicast (lifecycle.py subscribes to it): a netlink
header and an ``inet_diag_msg`` (layout in sockdiag.py) followed by ``INET_DIAG_INFO``
(``struct tcp_info``, tcpinfo.py) and ``INET_DIAG_PROTOCOL``.


Each event is classified (docs/connections.md has the user's view):

* direction: ``inbound`` when the local port is a listener's port or outside
  ``ip_local_port_range``, ``outbound`` when it is inside (the poll's own test);
* peer: inbound, the listener the connection arrived on as ``ss -lnt`` prints it
  ("0.0.0.0:8080", "[::]:8080", "127.0.0.1:8080"); outbound, the destination "10.0.0.5:5432",
  "[2001:db8::5]:443";
* outcome: ``ok`` (handshake completed: tcpi_delivered > 0, the SYN or SYN-ACK counts),
  ``timeout`` (nothing ever answered: tcpi_segs_in == 0), ``refused`` (answered, with a reset,
  before completing), ``aborted`` (see below).

A blocking ``connect()`` that fails and a ``close()`` with ``SO_LINGER`` 0 (how haproxy and
Envoy close a failed connect) both go through ``tcp_disconnect`` (net/ipv4/tcp.c), which clears
the destination port, the source address (unless bound explicitly) and tcp_info's counters before
the socket is destroyed. Their peer is the destination address without a port (outbound:
"10.0.0.5") or the listener found by the local port alone (inbound), never an invented port.
Two fields survive the clearing and tell whether the handshake had completed
(``tcpinfo.handshake_completed``: the smallest RTT sample, the peer's window): a connection that
worked and was then cut abortively counts as ``ok``, a connect that never completed as
``aborted`` (refused or timed out: the clearing erased which).
Sockets that never had a peer (a closed listener, a socket never connected) are ``ignored``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tcpwatch.endpoints import endpoint
from tcpwatch.model import OUTCOMES, RTT_BUCKETS_SECONDS
from tcpwatch.sources.netlink import (
    INET_DIAG_INFO,
    INET_DIAG_PROTOCOL,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HEAD,
    SOCK_DIAG_BY_FAMILY,
    SockDiagError,
    find_attribute,
)
from tcpwatch.sources.sockdiag import INET_DIAG_MSG_MIN
from tcpwatch.sources.tcpinfo import TcpInfo, parse_tcp_info, was_established

DEFAULT_PORT_RANGE = (32768, 60999)  # the kernel's default, used until the poll tells

FAMILY_NAMES: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}
ADDRESS_BYTES: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}
ZERO16 = bytes(16)
V4_MAPPED = bytes(10) + b"\xff\xff"
# sport, dport, src[16], dst[16] at byte 20 of the message; then uid, inode at 80 (cookie at 60)
ENDPOINTS = struct.Struct("!HH16s16s")
COOKIE_UID_INODE = struct.Struct("=Q12xII")  # at byte 60: cookie u32[2]; expires, rqueue, wqueue
RTT_BOUNDS_US = tuple(round(bound * 1e6) for bound in RTT_BUCKETS_SECONDS)
OK, TIMEOUT, REFUSED, ABORTED = (OUTCOMES.index(name) for name in OUTCOMES)
INBOUND, OUTBOUND = 0, 1


@dataclass(frozen=True, slots=True)
class DestroyEvent:
    """One destroyed TCP socket as the kernel reported it (addresses as ``ss`` prints them)."""

    family: str  # "ipv4" / "ipv6"
    state: int  # idiag_state: TCP_CLOSE (7) for every socket seen so far
    source: str
    source_port: int
    destination: str
    destination_port: int
    uid: int
    inode: int
    cookie: int
    info: TcpInfo | None  # INET_DIAG_INFO, None when absent
    protocol: int | None  # INET_DIAG_PROTOCOL (6 = TCP), None when absent

    @property
    def cleared(self) -> bool:
        """tcp_disconnect cleared the destination port (and the counters); see module docstring."""
        return self.destination_port == 0 and self.destination not in ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class Classification:
    direction: str  # DIRECTIONS
    peer: str
    outcome: str  # OUTCOMES


@dataclass(frozen=True, slots=True)
class Context:
    """What the poll knows to classify events by: listeners and the ephemeral port range.

    ``listeners`` maps (16-byte address, IPv4 zero-padded, port) to the listener's label; build
    it with :func:`make_context`.
    """

    listen_ports: frozenset[int]
    port_range: tuple[int, int]
    listeners: dict[tuple[bytes, int], str]
    listeners_by_port: dict[int, str]


def make_context(
    listen_ports: Iterable[int],
    port_range: tuple[int, int] | None,
    listeners: Iterable[tuple[str, int]] = (),
) -> Context:
    """A Context from the poll's data; ``listeners`` are (address, port) as model.Listener has."""
    index: dict[tuple[bytes, int], str] = {}
    by_port: dict[int, str] = {}
    for address, port in sorted(set(listeners)):
        try:
            packed = socket.inet_pton(
                socket.AF_INET6 if ":" in address else socket.AF_INET, address
            )
        except OSError:
            continue
        label = endpoint(address, port)
        index[(packed.ljust(16, b"\0"), port)] = label
        by_port.setdefault(port, label)
    ports = frozenset(listen_ports) | frozenset(by_port)
    return Context(ports, port_range or DEFAULT_PORT_RANGE, index, by_port)


def _is_inbound(sport: int, context: Context) -> bool:
    low, high = context.port_range
    return sport in context.listen_ports or not low <= sport <= high


def address_of(family_number: int, padded: bytes) -> str:
    return socket.inet_ntop(family_number, padded[: ADDRESS_BYTES[family_number]])


def inbound_peer(family_number: int, local: bytes, sport: int, context: Context) -> str:
    """The listener a connection arrived on: exact address, then the family's wildcard."""
    listeners = context.listeners
    label = listeners.get((local, sport)) or listeners.get((ZERO16, sport))
    if label is None and local.startswith(V4_MAPPED):  # IPv4 client of a dual-stack listener
        label = listeners.get((local[12:].ljust(16, b"\0"), sport))
    if label is not None:
        return label
    if local == ZERO16:  # address cleared by tcp_disconnect: any listener on the port
        return context.listeners_by_port.get(sport, f"*:{sport}")
    return endpoint(address_of(family_number, local), sport)  # listener unknown (or gone)


def outbound_peer(family_number: int, remote: bytes, dport: int) -> str:
    address = address_of(family_number, remote)
    return endpoint(address, dport) if dport else address  # no port: tcp_disconnect cleared it


def _outcome(dport: int, delivered: int, segs_in: int, established: bool = False) -> int:
    if dport == 0:
        return OK if established else ABORTED
    if delivered:
        return OK
    return REFUSED if segs_in else TIMEOUT


CloseFields = tuple[int, int, int, int, int, int, int, int, int, int]


def fields_of(info: TcpInfo) -> CloseFields:
    """CLOSE_FIELDS_WND's values from a short tcp_info (kernels before 5.4): absent fields count
    0, but an absent snd_wnd is -1 (unknown, not a zero window).

    Without tcpi_delivered a completed handshake shows as bytes either way (each side's SYN or
    FIN counts one) or negotiated options; without tcpi_segs_in (before 4.2) a failed connect
    counts as a timeout.
    """
    acked = info.bytes_acked or 0
    received = info.bytes_received or 0
    delivered = info.delivered
    if delivered is None:
        delivered = 1 if acked or received or info.options else 0
    return (
        info.rtt or 0,
        info.total_retrans or 0,
        acked,
        received,
        info.segs_out or 0,
        info.segs_in or 0,
        info.busy_time or 0,
        info.rwnd_limited or 0,
        info.sndbuf_limited or 0,
        delivered,
    )


def classify(event: DestroyEvent, context: Context) -> Classification | None:
    """Direction, peer and outcome of one event; None for a socket that never had a peer."""
    family_number = socket.AF_INET if event.family == "ipv4" else socket.AF_INET6
    local = socket.inet_pton(family_number, event.source).ljust(16, b"\0")
    remote = socket.inet_pton(family_number, event.destination).ljust(16, b"\0")
    if event.destination_port == 0 and remote == ZERO16:
        return None
    if event.info is None:
        return None
    fields = fields_of(event.info)
    outcome = _outcome(event.destination_port, fields[9], fields[5], was_established(event.info))
    if _is_inbound(event.source_port, context):
        peer = inbound_peer(family_number, local, event.source_port, context)
        return Classification("inbound", peer, OUTCOMES[outcome])
    peer = outbound_peer(family_number, remote, event.destination_port)
    return Classification("outbound", peer, OUTCOMES[outcome])


def check_other_message(
    buffer: bytes | memoryview, offset: int, msg_len: int, msg_type: int, length: int
) -> None:
    """Anything but a well-formed inet_diag message: raise, or return to skip it (DONE, NOOP)."""
    if msg_len < 16 or offset + msg_len > length:
        raise SockDiagError(f"bad netlink message length {msg_len} at byte {offset} of {length}")
    if msg_type == SOCK_DIAG_BY_FAMILY:
        if msg_len < INET_DIAG_MSG_MIN:
            raise SockDiagError(f"inet_diag message of {msg_len} bytes at byte {offset}")
        raise SockDiagError(f"unknown address family {buffer[offset + 16]} at byte {offset}")
    if msg_type == NLMSG_ERROR:
        raise SockDiagError(f"netlink error message at byte {offset}")
    if msg_type != NLMSG_DONE and msg_type >= 16:
        raise SockDiagError(f"unexpected netlink message type {msg_type} at byte {offset}")


def _messages(buffer: bytes | memoryview, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each inet_diag message; DONE and NOOP messages are skipped."""
    offset = 0
    while offset < length:
        if length - offset < 16:
            raise SockDiagError(f"truncated netlink header at byte {offset} of {length}")
        msg_len, msg_type = NLMSG_HEAD.unpack_from(buffer, offset)
        if (
            msg_type != SOCK_DIAG_BY_FAMILY
            or msg_len < INET_DIAG_MSG_MIN
            or offset + msg_len > length
            or buffer[offset + 16] not in ADDRESS_BYTES
        ):
            check_other_message(buffer, offset, msg_len, msg_type, length)
        else:
            yield offset, msg_len
        offset += (msg_len + 3) & ~3


def parse_destroy_messages(buffer: bytes | memoryview) -> Iterator[DestroyEvent]:
    """Every destroy event in a datagram (or several concatenated); SockDiagError on garbage."""
    for offset, msg_len in _messages(buffer, len(buffer)):
        family_number = buffer[offset + 16]
        sport, dport, src, dst = ENDPOINTS.unpack_from(buffer, offset + 20)
        cookie, uid, inode = COOKIE_UID_INODE.unpack_from(buffer, offset + 60)
        end = offset + msg_len
        info = None
        found = find_attribute(buffer, offset + INET_DIAG_MSG_MIN, end, INET_DIAG_INFO)
        if found is not None:
            info = parse_tcp_info(bytes(buffer[found[0] : found[0] + found[1]]))
        protocol = None
        found = find_attribute(buffer, offset + INET_DIAG_MSG_MIN, end, INET_DIAG_PROTOCOL)
        if found is not None and found[1] >= 1:
            protocol = buffer[found[0]]
        yield DestroyEvent(
            family=FAMILY_NAMES[family_number],
            state=buffer[offset + 17],
            source=address_of(family_number, src),
            source_port=sport,
            destination=address_of(family_number, dst),
            destination_port=dport,
            uid=uid,
            inode=inode,
            cookie=cookie,
            info=info,
            protocol=protocol,
        )
