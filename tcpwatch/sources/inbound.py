"""The listeners' live connections: a bounded sock_diag scan of the ESTABLISHED sockets they
accepted, with tcp_info and socket memory (source ``inbound``, docs/connections.md).

The cheap poll never copies inbound connections out of the kernel (ESTABLISHED is derived,
sockdiag.py), so what a service's clients are doing to it (zero windows, receive queues the
service does not drain) needs a scan of its own. It runs on the per-destination cadence
(``collect.destinations_interval``; polls in between keep the last scan), one dump per family
that has listeners:

* state ESTABLISHED, with ``INET_DIAG_INFO`` and ``INET_DIAG_SKMEMINFO`` (liveinfo.py reads both
  in one unpack per message);
* an inet_diag bytecode filter evaluated in the kernel: the local port equals one of the
  listeners' ports (up to :data:`EXACT_PORTS` ports), or else lies outside
  ``ip_local_port_range`` (where the kernel never picks a client port);
* at most ``collect.inbound_connections`` messages in all. Then the dump's socket is closed,
  which ends the dump in the kernel: the scan read the first connections of its hash walk, a
  sample, and says so (``complete`` False).

Each connection belongs to the listener with its local port and address (else the family's
wildcard listener on the port), named as ``ss -lnt`` writes it: the inbound peer of the
connection metrics.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tcpwatch.config import CollectSettings
from tcpwatch.endpoints import endpoint
from tcpwatch.model import FAMILIES, Listener, Snapshot
from tcpwatch.sources import liveinfo, livesums, netlink
from tcpwatch.sources.base import SourceContext, netns_source
from tcpwatch.sources.liveinfo import RowReader
from tcpwatch.sources.netlink import (
    FAMILY_NUMBER,
    INET_DIAG_BC_S_GE,
    INET_DIAG_BC_S_LE,
    INFO_EXTENSION,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HEAD,
    SKMEMINFO_EXTENSION,
    SOCK_DIAG_BY_FAMILY,
    SockDiagError,
)
from tcpwatch.sources.sockdiag import ESTABLISHED_MASK, INET_DIAG_MSG_MIN, TCP_ESTABLISHED
from tcpwatch.stalls import InboundScan, ListenerConnections

INET_DIAG_BC_JMP = 1  # an unconditional op: always takes its "no" jump
EXACT_PORTS = 16  # beyond this many listener ports, filter by "outside the ephemeral range"
EXTENSIONS = INFO_EXTENSION | SKMEMINFO_EXTENSION
LEADERS = 3  # a listener's clients kept as its worst peers: the longest waits on their windows
_OP = struct.Struct("=BBH")
_LOCAL = struct.Struct("!20xH2x16s")  # sport, src[16] of an inet_diag message
_WILDCARD = bytes(16)


def _comparison(code: int, port: int) -> bytes:
    """One port comparison as a program of its own: true lands at its end (accept), false 4
    bytes past it (reject). 8 bytes: the op and the operand op carrying the port."""
    return _OP.pack(code, 8, 12) + _OP.pack(0, 0, port)


def _equal(port: int) -> bytes:
    """``port <= local port <= port`` as a program of its own (16 bytes)."""
    return (
        _OP.pack(INET_DIAG_BC_S_GE, 8, 20)
        + _OP.pack(0, 0, port)
        + _comparison(INET_DIAG_BC_S_LE, port)
    )


def any_of(programs: Sequence[bytes]) -> bytes:
    """Programs joined by OR, as ``ss`` compiles ``a or b``: each is followed by a JMP whose
    taken branch leaps to the very end (accept); a program's reject lands 4 bytes past its end,
    on the next one. The kernel's audit (inet_diag_bc_audit) requires every branch target to
    lie on the chain of "yes" jumps, which this layout keeps: JMP's "yes" is the next op."""
    joined = b""
    for index, program in enumerate(programs):
        joined += program
        if index < len(programs) - 1:
            rest = sum(len(p) + 4 for p in programs[index + 1 :]) - 4
            joined += _OP.pack(INET_DIAG_BC_JMP, 4, rest + 4)
    return joined


def listener_ports_bytecode(ports: Sequence[int]) -> bytes:
    """inet_diag bytecode accepting sockets whose local port is one of ``ports``."""
    return any_of([_equal(port) for port in ports])


def port_filter(ports: Sequence[int], port_range: tuple[int, int] | None) -> bytes:
    """The kernel-side filter for one family's listener ports: each port exactly, or, beyond
    :data:`EXACT_PORTS` ports, every local port outside ``ip_local_port_range`` plus the
    listener ports inside it (up to EXACT_PORTS of them)."""
    distinct = sorted(set(ports))
    if len(distinct) <= EXACT_PORTS or port_range is None:
        return listener_ports_bytecode(distinct)
    low, high = port_range
    programs = [_equal(port) for port in distinct if low <= port <= high][:EXACT_PORTS]
    if low > 0:
        programs.append(_comparison(INET_DIAG_BC_S_LE, low - 1))
    if high < 65535:
        programs.append(_comparison(INET_DIAG_BC_S_GE, high + 1))
    return any_of(programs)


@dataclass(slots=True)
class _Group:
    """One listener's connections while the scan runs."""

    listener: Listener
    rows: livesums.PeerRows | None = None


class InboundAggregator:
    """Consumes one family's dump at a time, keeping rows per listener, ``limit`` in all."""

    def __init__(self, listeners: Sequence[Listener], limit: int) -> None:
        self.limit = limit
        self.reader = RowReader()
        self.connections = 0
        self.unmatched = 0
        self.cut = False  # stopped at the limit before a dump ended
        self._groups: dict[tuple[str, str, int], _Group] = {}
        self._by_key: dict[tuple[str, bytes, int], _Group] = {}
        for listener in listeners:
            group_key = (listener.family, listener.address, listener.port)
            group = self._groups.get(group_key)
            if group is None:
                group = self._groups[group_key] = _Group(listener)
            packed = socket.inet_pton(FAMILY_NUMBER[listener.family], listener.address)
            self._by_key[(listener.family, packed.ljust(16, b"\0"), listener.port)] = group

    def feed(self, data: bytes | memoryview, length: int, family: str) -> bool:
        """Parse one datagram; True when the dump ended or the limit was reached."""
        by_key = self._by_key
        fold_messages = livesums.FOLD_MESSAGES
        view = data if isinstance(data, memoryview) else memoryview(data)
        offset = 0
        while offset < length:
            if length - offset < 16:
                raise SockDiagError(f"truncated netlink header at byte {offset} of {length}")
            msg_len, msg_type = NLMSG_HEAD.unpack_from(data, offset)
            if msg_len < 16 or offset + msg_len > length:
                raise SockDiagError(f"bad netlink message length {msg_len} at byte {offset}")
            if msg_type == NLMSG_DONE:
                return True
            if msg_type == NLMSG_ERROR:
                raise SockDiagError(f"kernel answered the inbound dump with an error at {offset}")
            if msg_type != SOCK_DIAG_BY_FAMILY or msg_len < INET_DIAG_MSG_MIN:
                raise SockDiagError(f"unexpected netlink message type {msg_type} at {offset}")
            if data[offset + 17] == TCP_ESTABLISHED:
                self.connections += 1
                port, source = _LOCAL.unpack_from(data, offset)
                group = by_key.get((family, source, port)) or by_key.get((family, _WILDCARD, port))
                if group is None:
                    self.unmatched += 1
                elif (rows := group.rows) is not None and rows.size == msg_len:
                    pieces = rows.pieces
                    pieces.append(view[offset : offset + msg_len].tobytes())
                    if len(pieces) >= fold_messages:
                        rows.fold(self.reader)
                else:
                    self._first(group, data, offset, msg_len)
                if self.connections >= self.limit:
                    self.cut = True
                    return True
            offset += (msg_len + 3) & ~3
        return False

    def _first(self, group: _Group, data: bytes | memoryview, offset: int, msg_len: int) -> None:
        """A listener's first connection, or one of another message length than its others."""
        layout = self.reader.layout(data, offset, msg_len)
        if layout is None:
            return  # no usable tcp_info: counted as read, not described
        if group.rows is None:
            group.rows = livesums.PeerRows(layout, leaders=LEADERS)
        else:
            group.rows.switch(layout, self.reader)
        group.rows.pieces.append(bytes(data[offset : offset + msg_len]))

    def result(self, complete: bool, scanned_at: float) -> InboundScan:
        listeners = []
        for group in sorted(
            self._groups.values(),
            key=lambda g: (g.listener.port, g.listener.family, g.listener.address),
        ):
            if group.rows is None:
                continue
            ends = functools.partial(liveinfo.endpoints_of, family=group.listener.family)
            stalls = group.rows.finish(self.reader, ends)
            listener = group.listener
            listeners.append(
                ListenerConnections(
                    listener=endpoint(listener.address, listener.port),
                    family=listener.family,
                    address=listener.address,
                    port=listener.port,
                    inode=listener.inode,
                    stalls=stalls,
                )
            )
        return InboundScan(
            listeners=tuple(listeners),
            connections=self.connections,
            limit=self.limit,
            complete=complete and not self.cut,
            unmatched=self.unmatched,
            scanned_at=scanned_at,
        )


def _datagrams(sock: socket.socket, buffer: memoryview) -> Iterator[int]:
    while True:
        length = sock.recv_into(buffer)
        if length <= 0:
            raise SockDiagError("netlink socket closed before the inbound dump ended")
        yield length


def scan(
    listeners: Sequence[Listener],
    port_range: tuple[int, int] | None,
    limit: int,
    scanned_at: float,
) -> InboundScan:
    """Dump the listeners' ESTABLISHED connections of this namespace (module docstring).

    Each family's dump has its own socket, closed when the dump ends or the limit is reached
    (closing a netlink socket mid-dump is how the dump is abandoned)."""
    aggregator = InboundAggregator(listeners, limit)
    buffer = memoryview(bytearray(1 << 17))
    for sequence, family in enumerate(FAMILIES, start=1):
        ports = [listener.port for listener in listeners if listener.family == family]
        if not ports or aggregator.cut:
            continue
        request = netlink.build_request(
            family, ESTABLISHED_MASK, port_filter(ports, port_range), sequence, EXTENSIONS
        )
        connection = netlink.open_socket()
        try:
            connection.send(request)
            for length in _datagrams(connection, buffer):
                if aggregator.feed(buffer, length, family):
                    break
        except OSError as error:
            raise SockDiagError(f"inbound sock_diag dump ({family}) failed: {error}") from error
        finally:
            connection.close()
    return aggregator.result(complete=True, scanned_at=scanned_at)


def _enabled(settings: CollectSettings) -> bool:
    return settings.inbound_connections > 0


@netns_source("inbound", field="inbound", order=45, needs=("sockdiag",), enabled=_enabled)
def read_inbound_source(context: SourceContext, so_far: Snapshot) -> InboundScan:
    """Scan when this poll dumps destinations afresh (or nothing was scanned before); else keep
    the previous poll's scan, as the per-destination data is kept. A scan the limit cut short
    says so in ``complete`` (exported), not as a degraded source: on a busy host that is the
    design, not a fault."""
    previous = context.previous.inbound if context.previous is not None else None
    if context.earlier is not None and previous is not None:
        return previous
    sockets = so_far.sockets
    if sockets is None:  # unreachable: needs=("sockdiag",)
        raise SockDiagError("no listeners known: the socket dump failed")
    sysctls = so_far.sysctls
    port_range = sysctls.port_range if sysctls is not None else None
    return scan(
        sockets.listeners, port_range, context.settings.inbound_connections, context.taken_at
    )
