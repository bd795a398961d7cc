"""Closed TCP connections, heard on the kernel's socket-destroy multicast (what ``ss -E`` reads).

A ``NETLINK_SOCK_DIAG`` socket bound to the groups ``SKNLGRP_INET_TCP_DESTROY`` (1) and
``SKNLGRP_INET6_TCP_DESTROY`` (3) receives one message per destroyed TCP socket of the network
namespace it was created in (net/core/sock.c ``sk_destruct`` -> net/core/sock_diag.c
``sock_diag_broadcast_destroy``). Each is a netlink header and an ``inet_diag_msg`` (layout in
sockdiag.py) followed by ``INET_DIAG_INFO`` (``struct tcp_info``, tcpinfo.py) and
``INET_DIAG_PROTOCOL``. Binding needs no privilege (sock_diag's netlink kernel socket has
``NL_CFG_F_NONROOT_RECV``).

Each event is classified (docs/connections.md has the user's view):

* direction: ``inbound`` when the local port is a listener's port or outside
  ``ip_local_port_range``, ``outbound`` when it is inside (the poll's own test);
* peer: inbound, the listener the connection arrived on as ``ss -lnt`` prints it
  ("0.0.0.0:8080", "[::]:8080", "127.0.0.1:8080"); outbound, the destination "10.0.0.5:5432",
  "[2001:db8::5]:443";
* outcome: ``ok`` (handshake completed: tcpi_delivered > 0, the SYN or SYN-ACK counts),
  ``timeout`` (nothing ever answered: tcpi_segs_in == 0), ``refused`` (answered, with a reset,
  before completing), ``aborted`` (see below).

A blocking ``connect()`` that fails and a ``close()`` with ``SO_LINGER`` 0 both go through
``tcp_disconnect`` (net/ipv4/tcp.c), which clears the destination port, the source address
(unless bound explicitly) and tcp_info's counters before the socket is destroyed. Those events
count as outcome ``aborted``; their peer is the destination address without a port (outbound:
"10.0.0.5") or the listener found by the local port alone (inbound), never an invented port.
Sockets that never had a peer (a closed listener, a socket never connected) are ``ignored``.
"""

from __future__ import annotations

import bisect
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from tcpwatch.endpoints import endpoint
from tcpwatch.model import (
    DIRECTIONS,
    OUTCOMES,
    PEER_OTHER,
    RTT_BUCKETS_SECONDS,
    LifecycleStats,
    PeerStats,
)
from tcpwatch.sources.netlink import (
    INET_DIAG_INFO,
    INET_DIAG_PROTOCOL,
    NETLINK_SOCK_DIAG,
    NLATTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HEAD,
    SOCK_DIAG_BY_FAMILY,
    SockDiagError,
    find_attribute,
)
from tcpwatch.sources.sockdiag import INET_DIAG_MSG_MIN
from tcpwatch.sources.tcpinfo import CLOSE_FIELDS, TcpInfo, parse_tcp_info

SKNLGRP_INET_TCP_DESTROY = 1
SKNLGRP_INET6_TCP_DESTROY = 3
DESTROY_GROUPS = (1 << (SKNLGRP_INET_TCP_DESTROY - 1)) | (1 << (SKNLGRP_INET6_TCP_DESTROY - 1))
DEFAULT_RECEIVE_BUFFER = 4 << 20  # bytes asked for; the kernel doubles it (socket(7))
DEFAULT_MAX_PEERS = 100
DEFAULT_PEER_IDLE_SECONDS = 3600.0
DEFAULT_PORT_RANGE = (32768, 60999)  # the kernel's default, used until the poll tells
SO_RCVBUFFORCE = 33
SO_MEMINFO = 55  # u32[SK_MEMINFO_VARS]; index 8 is sk_drops (include/uapi/linux/sock_diag.h)
_SK_MEMINFO_DROPS = 8
_MAX_DATAGRAMS_PER_READ = 8192  # read_ready returns after this many; the fd stays readable
_BATCH = 512  # datagrams read under one hold of the lock
_EVENT_TRUESIZE = 1280  # receive-buffer bytes one queued destroy message takes (6.18, measured)
_ROUTE_CACHE_LIMIT = 4096
_SWEEP_INTERVAL = 1.0  # seconds between idle-peer sweeps forced by a full table

_FAMILY_NAMES: dict[int, str] = {int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}
_ADDRESS_BYTES: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}
_ZERO16 = bytes(16)
_V4_MAPPED = bytes(10) + b"\xff\xff"
# sport, dport, src[16], dst[16] at byte 20 of the message; then uid, inode at 80 (cookie at 60)
_ENDPOINTS = struct.Struct("!HH16s16s")
_COOKIE_UID_INODE = struct.Struct("=Q8xII")  # at byte 60: cookie u32[2], expires, rqueue, wqueue
_RTT_BOUNDS_US = tuple(round(bound * 1e6) for bound in RTT_BUCKETS_SECONDS)
_OK, _TIMEOUT, _REFUSED, _ABORTED = (OUTCOMES.index(name) for name in OUTCOMES)
_INBOUND, _OUTBOUND = 0, 1


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


def _address(family_number: int, padded: bytes) -> str:
    return socket.inet_ntop(family_number, padded[: _ADDRESS_BYTES[family_number]])


def _inbound_peer(family_number: int, local: bytes, sport: int, context: Context) -> str:
    """The listener a connection arrived on: exact address, then the family's wildcard."""
    listeners = context.listeners
    label = listeners.get((local, sport)) or listeners.get((_ZERO16, sport))
    if label is None and local.startswith(_V4_MAPPED):  # IPv4 client of a dual-stack listener
        label = listeners.get((local[12:].ljust(16, b"\0"), sport))
    if label is not None:
        return label
    if local == _ZERO16:  # address cleared by tcp_disconnect: any listener on the port
        return context.listeners_by_port.get(sport, f"*:{sport}")
    return endpoint(_address(family_number, local), sport)  # listener unknown (or gone)


def _outbound_peer(family_number: int, remote: bytes, dport: int) -> str:
    address = _address(family_number, remote)
    return endpoint(address, dport) if dport else address  # no port: tcp_disconnect cleared it


def _outcome(dport: int, delivered: int, segs_in: int) -> int:
    if dport == 0:
        return _ABORTED
    if delivered:
        return _OK
    return _REFUSED if segs_in else _TIMEOUT


def _close_fields(info: TcpInfo) -> tuple[int, int, int, int, int, int, int]:
    """CLOSE_FIELDS' values from a short tcp_info (kernels before 4.18): absent fields count 0.

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
        delivered,
    )


def classify(event: DestroyEvent, context: Context) -> Classification | None:
    """Direction, peer and outcome of one event; None for a socket that never had a peer."""
    family_number = socket.AF_INET if event.family == "ipv4" else socket.AF_INET6
    local = socket.inet_pton(family_number, event.source).ljust(16, b"\0")
    remote = socket.inet_pton(family_number, event.destination).ljust(16, b"\0")
    if event.destination_port == 0 and remote == _ZERO16:
        return None
    if event.info is None:
        return None
    fields = _close_fields(event.info)
    outcome = _outcome(event.destination_port, fields[6], fields[5])
    if _is_inbound(event.source_port, context):
        peer = _inbound_peer(family_number, local, event.source_port, context)
        return Classification("inbound", peer, OUTCOMES[outcome])
    peer = _outbound_peer(family_number, remote, event.destination_port)
    return Classification("outbound", peer, OUTCOMES[outcome])


def _check_other_message(
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
            or buffer[offset + 16] not in _ADDRESS_BYTES
        ):
            _check_other_message(buffer, offset, msg_len, msg_type, length)
        else:
            yield offset, msg_len
        offset += (msg_len + 3) & ~3


def parse_destroy_messages(buffer: bytes | memoryview) -> Iterator[DestroyEvent]:
    """Every destroy event in a datagram (or several concatenated); SockDiagError on garbage."""
    for offset, msg_len in _messages(buffer, len(buffer)):
        family_number = buffer[offset + 16]
        sport, dport, src, dst = _ENDPOINTS.unpack_from(buffer, offset + 20)
        cookie, uid, inode = _COOKIE_UID_INODE.unpack_from(buffer, offset + 60)
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
            family=_FAMILY_NAMES[family_number],
            state=buffer[offset + 17],
            source=_address(family_number, src),
            source_port=sport,
            destination=_address(family_number, dst),
            destination_port=dport,
            uid=uid,
            inode=inode,
            cookie=cookie,
            info=info,
            protocol=protocol,
        )


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
        self.rtt = [0] * (len(_RTT_BOUNDS_US) + 1)
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
        endpoints = _ENDPOINTS.unpack_from
        close_fields = CLOSE_FIELDS.unpack_from
        close_size = CLOSE_FIELDS.size
        bounds = _RTT_BOUNDS_US
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
                        or data[offset + 16] not in _ADDRESS_BYTES
                    ):
                        _check_other_message(data, offset, msg_len, msg_type, length)
                        offset += (msg_len + 3) & ~3
                        continue
                    end = offset + msg_len
                    offset = (end + 3) & ~3
                    events += 1
                    sport, dport, src, dst = endpoints(data, end - msg_len + 20)
                    if dport == 0 and dst == _ZERO16:
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
                        rtt, retrans, acked, received, segs_out, segs_in, delivered = _close_fields(
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
                    if dport == 0:
                        peer.closed[_ABORTED] += 1
                    elif delivered:
                        peer.closed[_OK] += 1
                    elif segs_in:
                        peer.closed[_REFUSED] += 1
                    else:
                        peer.closed[_TIMEOUT] += 1
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
            label = _inbound_peer(family_number, address, port, self.context)
        else:
            label = _outbound_peer(family_number, address, port)
        direction = _INBOUND if inbound else _OUTBOUND
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


def open_destroy_socket(receive_buffer: int = DEFAULT_RECEIVE_BUFFER) -> socket.socket:
    """A non-blocking socket subscribed to this namespace's TCP destroy events.

    The buffer is set with SO_RCVBUFFORCE when the caller may (CAP_NET_ADMIN), else with
    SO_RCVBUF, which the kernel caps at net.core.rmem_max.
    """
    try:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
            NETLINK_SOCK_DIAG,
        )
    except (OSError, AttributeError) as error:
        raise SockDiagError(f"cannot open a NETLINK_SOCK_DIAG socket: {error}") from error
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, DESTROY_GROUPS))
    except OSError as error:
        sock.close()
        raise SockDiagError(f"cannot subscribe to TCP destroy events: {error}") from error
    return sock


class DestroyListener:
    """One namespace's destroy-event subscription, read between polls and drained by each.

    Create it on a thread that is in the namespace to watch (a socket stays in the namespace it
    was created in). ``read_ready`` runs on the reader thread when ``fileno()`` is readable;
    ``update_context`` and ``drain`` on the poll thread; a lock keeps them apart.

    Lost events: the kernel drops a multicast message when this socket's receive buffer is
    full. ``overruns`` counts the recv() calls that failed with ENOBUFS (the kernel reports a
    run of drops once, so each means one or more messages lost); ``lost`` is the exact number
    of dropped messages, the socket's sk_drops read with SO_MEMINFO at each drain.
    """

    def __init__(
        self,
        receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
        max_peers: int = DEFAULT_MAX_PEERS,
        peer_idle_seconds: float = DEFAULT_PEER_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sock: socket.socket | None = None,
    ) -> None:
        self._sock = sock if sock is not None else open_destroy_socket(receive_buffer)
        self._lock = threading.Lock()
        self._aggregator = LifecycleAggregator(max_peers, peer_idle_seconds, clock)
        self._buffer = memoryview(bytearray(1 << 16))
        self._overruns = 0
        self._drained = False
        self._lost: int | None = None
        self._closed = False
        self.receive_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def read_delay(self) -> float:
        """Seconds a reader thread may sleep after each ``read_ready`` to read events in batches.

        Waking once per event costs about 9 us per event, reading in batches about 4 us
        (benchmarks/bench_lifecycle.py). The delay is the time 20,000 events/s take to fill a
        quarter of the buffer (each queued event takes about 1,280 bytes of it), at most 20 ms:
        20 ms with the default 8 MiB buffer, about 4 ms with an unprivileged 416 KiB one.
        """
        events = self.receive_buffer / _EVENT_TRUESIZE
        return min(0.02, events / 4 / 20_000)

    def read_ready(self) -> None:
        """Read and count every pending datagram, without blocking.

        At most 8,192 datagrams per call (the fd stays readable if more wait); the lock is
        taken per batch of 512, so a drain waits for one batch at most (about 2 ms).
        """
        for _ in range(_MAX_DATAGRAMS_PER_READ // _BATCH):
            with self._lock:
                consumed = self._aggregator.consume(self._buffer, self._receive(_BATCH))
            if consumed < _BATCH or self._drained:
                return

    def _receive(self, limit: int) -> Iterator[int]:
        """Fill the buffer with the next datagram, up to ``limit`` times; yields its length."""
        receive = self._sock.recv_into
        buffer = self._buffer
        self._drained = False
        for _ in range(limit):
            try:
                length = receive(buffer)
            except (BlockingIOError, InterruptedError):
                self._drained = True
                return
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    self._overruns += 1  # the kernel dropped messages since the last read
                    continue
                raise SockDiagError(f"reading TCP destroy events failed: {error}") from error
            if length <= 0:
                self._drained = True
                return
            yield length

    def update_context(
        self,
        listen_ports: frozenset[int],
        port_range: tuple[int, int] | None,
        listeners: Iterable[tuple[str, int]] = (),
    ) -> None:
        """The poll's listener ports (and, optionally, (address, port) of each listener, which
        name inbound peers as the listener; without them the local address names it) and
        ip_local_port_range (None: the kernel's default, 32768-60999)."""
        context = make_context(listen_ports, port_range, listeners)
        with self._lock:
            self._aggregator.update_context(context)

    def drain(self) -> LifecycleStats:
        """An immutable, cumulative snapshot of everything counted so far."""
        with self._lock:
            if not self._closed:
                self._lost = _socket_drops(self._sock)
            return self._aggregator.stats(self._overruns, self._lost, self.receive_buffer)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._lost = _socket_drops(self._sock)
                self._closed = True
                self._sock.close()


def _socket_drops(sock: socket.socket) -> int | None:
    """sk_drops of a socket (SO_MEMINFO, Linux 4.12+), None when the kernel does not say."""
    size = (_SK_MEMINFO_DROPS + 1) * 4
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, size)
    except OSError:
        return None
    if len(raw) < size:
        return None
    value: int = struct.unpack_from("=I", raw, _SK_MEMINFO_DROPS * 4)[0]
    return value
