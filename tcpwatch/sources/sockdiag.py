"""TCP sockets through NETLINK_SOCK_DIAG (inet_diag), parsed with struct, streaming.

Cost is what matters here, so the dumps ask the kernel for as little as possible:

Each dump is one request for both families (``build_request`` with family None: one walk of the
hash tables, where a request per family walks them twice), unless the kernel refuses it.

* dump 1: every state but ESTABLISHED, no filter. Listeners come first (the kernel
  walks the listening hash before the established one), then request sockets, TIME_WAIT,
  CLOSE_WAIT ... These are few on a healthy host, apart from TIME_WAIT. It asks for
  ``INET_DIAG_SKMEMINFO``, for the listeners' drop counters (sk_drops, ``ss -ltnm`` d<N>):
  timewait and request sockets never carry it, so on 6.18 it costs nothing measurable here, and
  about 4% when ESTABLISHED is dumped too (benchmarks/bench_listener_drops.py).
* dump 2: ESTABLISHED only, with an inet_diag bytecode filter that keeps local ports
  inside ``ip_local_port_range``: the outbound connections that use ephemeral ports, counted per
  destination. Inbound connections (local port = a service port) are never copied out. It asks
  for ``INET_DIAG_INFO`` and ``INET_DIAG_SKMEMINFO`` too: each connection's tcp_info and socket
  memory give its destination's live RTT and retransmissions (DestinationUse.rtt_*,
  retransmits_in_flight ...) and where its time went (DestinationUse.stalls, liveinfo.py). With
  ESTABLISHED "dumped" (no port range or sockstat) that dump does not exist and those fields
  keep their defaults.
* Inbound ESTABLISHED is then exact arithmetic: ``/proc/net/sockstat{,6}`` ``inuse`` counts every
  full socket in the hash tables of a family, so inuse minus the full sockets dump 1 saw minus the
  ESTABLISHED sockets dump 2 saw is the rest of ESTABLISHED. Without inuse or a port range, every
  ESTABLISHED socket is dumped and counted instead.

Message layout (``struct nlmsghdr`` + ``struct inet_diag_msg``, native endian except ports and
addresses), offsets from the start of the netlink message::

     0 nlmsg_len u32 | 4 nlmsg_type u16 | 6 flags u16 | 8 seq u32 | 12 pid u32
    16 family u8 | 17 state u8 | 18 timer u8 | 19 retrans u8
    20 sport be16 | 22 dport be16 | 24 src[16] | 40 dst[16] | 56 if u32 | 60 cookie u32[2]
    68 expires u32 | 72 rqueue u32 | 76 wqueue u32 | 80 uid u32 | 84 inode u32 | 88 attributes
"""

from __future__ import annotations

import functools
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tcpwatch.model import (
    FAMILIES,
    STATES,
    Destination,
    DestinationUse,
    Listener,
    SelfConnect,
    SocketTable,
)
from tcpwatch.sources import liveinfo, livesums
from tcpwatch.sources.netlink import (
    FAMILY_NUMBER,
    INET_DIAG_SKMEMINFO,
    NLMSG_HEAD,
    SK_MEMINFO_DROPS,
    SOCK_DIAG_BY_FAMILY,
    TCPDIAG_GETSOCK,
    SockDiagError,
    family_of,
    find_attribute,
    has_attribute,
    unusual_message,
)
from tcpwatch.sources.netlink import INET_DIAG_MSG_MIN as INET_DIAG_MSG_MIN  # lifecycle's too
from tcpwatch.sources.timewait_runs import timewait_run

INET_DIAG_SHUTDOWN = 8  # every full socket carries it; request and TIME_WAIT sockets never do
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12
TIMER_TIME_WAIT = 3  # idiag_timer of timewait sockets (inet_twsk_diag_fill), FIN_WAIT2 ones too

ALL_STATES_MASK = sum(1 << n for n in range(1, 13))  # 1..11 and NEW_SYN_RECV; what `ss -ta` asks
ESTABLISHED_MASK = 1 << TCP_ESTABLISHED

ADDRESS_LENGTH = {"ipv4": 4, "ipv6": 16}
# States whose sockets hold a 4-tuple: the ones that use an ephemeral port towards a destination.
_TUPLE_STATES = frozenset({1, 2, 4, 5, 6, 8, 9, 11})
_STATE_BY_NAME = {name: number for number, name in enumerate(STATES, start=1)}

PORTS = struct.Struct("!HH")
_TUPLE_KEY = struct.Struct("34s")  # dport, src[16], dst[16]: one bytes object per socket
_QUEUES_INODE = struct.Struct("=IIII")  # rqueue, wqueue, uid, inode at offset 72
_U32 = struct.Struct("=I")


@dataclass(slots=True)
class _FamilyTotals:
    states: list[int]  # index = kernel state number, 0..12
    full_sockets: int  # full sockets seen in the unfiltered dump (what sockstat inuse counts)


class DumpAggregator:
    """Consumes inet_diag messages and keeps only aggregates: counts, listeners, destinations.

    Fed one netlink datagram at a time (``feed``), so a dump of any size needs one buffer.
    """

    def __init__(
        self,
        port_range: tuple[int, int] | None,
        attribute_states: Iterable[str] = ("close_wait",),
    ) -> None:
        self.port_range = port_range
        self.attribute_numbers = frozenset(_STATE_BY_NAME[name] for name in attribute_states)
        self.totals = {name: _FamilyTotals([0] * 13, 0) for name in FAMILIES}
        # raw listeners: (family, address bytes, port, rqueue, wqueue, inode, drops or None)
        self.listeners: list[tuple[str, bytes, int, int, int, int, int | None]] = []
        self.listen_ports: set[int] = set()
        self.request_sockets: Counter[tuple[str, bytes, int]] = Counter()
        # family -> {dport + src[16] + dst[16] bytes: sockets}, and the TIME_WAIT among them
        self.ephemeral: dict[str, dict[bytes, int]] = {name: {} for name in FAMILIES}
        self.ephemeral_time_wait: dict[str, dict[bytes, int]] = {name: {} for name in FAMILIES}
        # (family, dport + src[16] + dst[16]) -> SYN_SENT sockets
        self.syn_sent: Counter[tuple[str, bytes]] = Counter()
        self.self_connects: list[SelfConnect] = []
        self.inodes: dict[int, set[int]] = {n: set() for n in self.attribute_numbers}
        self.uids: set[int] = set()  # of the listeners and of ``inodes``: owners' likely uids
        self.messages = 0
        # Set before a dump that asked for INET_DIAG_INFO (and SKMEMINFO): ESTABLISHED ephemeral
        # sockets then add their message to ``live`` (key as ``ephemeral``), summed per
        # destination by livesums.PeerRows.
        self.read_info = False
        self.live: dict[str, dict[bytes, livesums.PeerRows]] = {name: {} for name in FAMILIES}
        self.rows = liveinfo.RowReader()

    def feed(self, data: memoryview | bytes, length: int, family: str | None) -> bool:
        """Parse one datagram; True once NLMSG_DONE has been seen.

        ``family`` None: a dump of both families in one walk (``build_request`` with family
        None); each message then says its own (``idiag_family``), messages of the two families
        come interleaved, as the kernel meets them in its hash tables, and carry the request's
        type (TCPDIAG_GETSOCK) instead of SOCK_DIAG_BY_FAMILY.

        The hot path of a poll (one pass per message of every dump): locals instead of
        attributes, one struct call per field group, no per-socket objects.
        """
        low, high = self.port_range if self.port_range else (1, 0)
        listen_ports = self.listen_ports
        tuple_states = _TUPLE_STATES
        attribute_numbers = self.attribute_numbers
        header = NLMSG_HEAD.unpack_from
        ports = PORTS.unpack_from
        tuple_key = _TUPLE_KEY.unpack_from
        read_info = self.read_info
        answer = SOCK_DIAG_BY_FAMILY if family is not None else TCPDIAG_GETSOCK
        current = -1  # the family number the locals below are for
        family_name = ""
        totals = _FamilyTotals([], 0)
        states: list[int] = []
        addr_len = 0
        ephemeral: dict[bytes, int] = {}
        ephemeral_time_wait: dict[bytes, int] = {}
        live: dict[bytes, livesums.PeerRows] = {}
        fold_messages = livesums.FOLD_MESSAGES
        view = data if isinstance(data, memoryview) else memoryview(data)
        # Not keyed per destination (nor attributed): ESTABLISHED and timewait sockets (no inode,
        # not full) are only counted, as cheaply as a message can be; a self-connect is looked at.
        count_established = not self.port_range and TCP_ESTABLISHED not in attribute_numbers
        count_timewait = not self.port_range
        offset = 0
        while offset < length:
            if length - offset < 16:
                raise SockDiagError(f"truncated netlink header at byte {offset} of {length}")
            msg_len, msg_type = header(data, offset)
            if msg_len < INET_DIAG_MSG_MIN or offset + msg_len > length:
                unusual_message(data, offset, msg_len, msg_type, length, answer)
                return True  # NLMSG_DONE (everything else raised)
            state = data[offset + 17]
            if not 0 < state <= TCP_NEW_SYN_RECV or msg_type != answer:
                unusual_message(data, offset, msg_len, msg_type, length, answer)
                return True
            if data[offset + 16] != current:
                current = data[offset + 16]
                family_name = family_of(current, family, offset)
                totals = self.totals[family_name]
                states = totals.states
                addr_len = ADDRESS_LENGTH[family_name]
                ephemeral = self.ephemeral[family_name]
                ephemeral_time_wait = self.ephemeral_time_wait[family_name]
                live = self.live[family_name]
            self.messages += 1
            if state == TCP_ESTABLISHED and count_established:
                states[TCP_ESTABLISHED] += 1
                totals.full_sockets += 1
                offset += (msg_len + 3) & ~3
                continue
            if count_timewait and data[offset + 18] == TIMER_TIME_WAIT:
                if run := timewait_run(view, offset, msg_len, length, states):
                    self.messages += run - 1  # a run of them, counted by columns
                    offset += run * msg_len
                    continue
                sport, dport = ports(data, offset + 20)
                if sport != dport:
                    states[state] += 1
                    offset += (msg_len + 3) & ~3
                    continue
            if state == TCP_NEW_SYN_RECV:
                state = TCP_SYN_RECV
            states[state] += 1
            sport, dport = ports(data, offset + 20)
            if state == TCP_LISTEN:
                rqueue, wqueue, uid, inode = _QUEUES_INODE.unpack_from(data, offset + 72)
                self.uids.add(uid)
                address = bytes(data[offset + 24 : offset + 24 + addr_len])
                drops = _listener_drops(data, offset, msg_len)
                self.listeners.append((family_name, address, sport, rqueue, wqueue, inode, drops))
                listen_ports.add(sport)
                totals.full_sockets += 1
            elif state == TCP_SYN_RECV and not has_attribute(
                data, offset + INET_DIAG_MSG_MIN, offset + msg_len, INET_DIAG_SHUTDOWN
            ):
                # A request socket: its local port and address are its listener's.
                address = bytes(data[offset + 24 : offset + 24 + addr_len])
                self.request_sockets[(family_name, address, sport)] += 1
            else:
                timewait = data[offset + 18] == TIMER_TIME_WAIT
                if not timewait:
                    totals.full_sockets += 1
                if state in tuple_states:
                    if low <= sport <= high and sport not in listen_ports:
                        # dport + src[16] + dst[16] (IPv4 addresses are zero-padded)
                        key = tuple_key(data, offset + 22)[0]
                        ephemeral[key] = ephemeral.get(key, 0) + 1
                        if state == TCP_TIME_WAIT:
                            ephemeral_time_wait[key] = ephemeral_time_wait.get(key, 0) + 1
                        elif state == TCP_ESTABLISHED and read_info:
                            # Once per outbound connection on a scan: the message joins its
                            # destination's buffer, raw (livesums.PeerRows sums them in C); a
                            # new destination or message length goes the long way, once.
                            rows = live.get(key)
                            if rows is not None and rows.size == msg_len:
                                pieces = rows.pieces
                                pieces.append(view[offset : offset + msg_len].tobytes())
                                if len(pieces) >= fold_messages:
                                    rows.fold(self.rows)
                            else:
                                self._live_other(live, key, data, offset, msg_len)
                    if state == TCP_SYN_SENT:
                        self.syn_sent[(family_name, tuple_key(data, offset + 22)[0])] += 1
                    if sport == dport:
                        self._maybe_self_connect(data, offset, family_name, state, sport, addr_len)
                if state in attribute_numbers and not timewait:
                    _, _, uid, inode = _QUEUES_INODE.unpack_from(data, offset + 72)
                    self.inodes[state].add(inode)
                    self.uids.add(uid)
            offset += (msg_len + 3) & ~3
        return False

    def _live_other(
        self,
        live: dict[bytes, livesums.PeerRows],
        key: bytes,
        data: memoryview | bytes,
        offset: int,
        msg_len: int,
    ) -> None:
        """A destination's first message, or one of another length than its others."""
        layout = self.rows.layout(data, offset, msg_len)
        if layout is None:
            return  # no usable tcp_info: counted, not described
        rows = live.get(key)
        if rows is None:
            rows = live[key] = livesums.PeerRows(layout)
        else:
            rows.switch(layout, self.rows)
        rows.pieces.append(bytes(data[offset : offset + msg_len]))

    def _maybe_self_connect(
        self,
        data: memoryview | bytes,
        offset: int,
        family: str,
        state: int,
        port: int,
        addr_len: int,
    ) -> None:
        source = bytes(data[offset + 24 : offset + 24 + addr_len])
        if source != bytes(data[offset + 40 : offset + 40 + addr_len]):
            return
        inode = _QUEUES_INODE.unpack_from(data, offset + 72)[3]
        address = _address(family, source)
        self.self_connects.append(SelfConnect(family, address, port, STATES[state - 1], inode))

    def result(self, inuse: Mapping[str, int] | None, established_dumped: bool) -> SocketTable:
        counts: dict[str, dict[str, int]] = {}
        for family, totals in self.totals.items():
            by_state = {name: totals.states[number] for number, name in enumerate(STATES, 1)}
            if not established_dumped and inuse is not None:
                # Full sockets not yet seen are the inbound ESTABLISHED ones dump 2 skipped.
                # Under churn the two reads can disagree by a few sockets; never below zero.
                unseen = inuse[family] - totals.full_sockets
                by_state["established"] += max(unseen, 0)
            counts[family] = by_state
        return SocketTable(
            counts=counts,
            listeners=self._listeners(),
            ephemeral_use=self._ephemeral_use(),
            syn_sent=self._syn_sent(),
            self_connects=tuple(self.self_connects),
            inodes_by_state={
                STATES[number - 1]: frozenset(inodes) for number, inodes in self.inodes.items()
            },
            established_method="dumped" if established_dumped else "derived",
            messages=self.messages,
            owner_uids=frozenset(self.uids),
        )

    def _listeners(self) -> tuple[Listener, ...]:
        raw = sorted(self.listeners, key=lambda item: (item[2], item[0], item[1], item[5]))
        syn_queues = self._syn_queues(raw)
        listeners: list[Listener] = []
        seen: Counter[tuple[str, bytes, int]] = Counter()
        for family, address, port, rqueue, wqueue, inode, drops in raw:
            index = seen[(family, address, port)]
            seen[(family, address, port)] += 1
            listeners.append(
                Listener(
                    family=family,
                    address=_address(family, address),
                    port=port,
                    queue_length=rqueue,
                    queue_max=wqueue,
                    syn_recv=syn_queues.get((family, address, port, index), 0),
                    inode=inode,
                    socket_index=index,
                    drops=drops,
                )
            )
        return tuple(listeners)

    def _syn_queues(
        self, raw: list[tuple[str, bytes, int, int, int, int, int | None]]
    ) -> dict[tuple[str, bytes, int, int], int]:
        """Give each listener the request sockets on its port, by the most specific address.

        Request sockets carry the local address the SYN was sent to, so one on a wildcard
        listener's port names a specific address; an IPv4 SYN to a dual-stack [::] listener
        yields an IPv6 request socket with a ::ffff:a.b.c.d address (both seen on 6.18). Within
        a SO_REUSEPORT group the kernel does not say which socket a request belongs to, so the
        group's first socket carries them all.
        """
        exact = {(f, a, p) for f, a, p, *_ in raw}
        queues: Counter[tuple[str, bytes, int, int]] = Counter()
        for (family, address, port), count in self.request_sockets.items():
            target = _owner_of_request(family, address, port, exact)
            if target is not None:
                queues[(*target, 0)] += count
        return dict(queues)

    def _ephemeral_use(self) -> tuple[DestinationUse, ...]:
        uses: list[DestinationUse] = []
        for family, counts in self.ephemeral.items():
            time_wait = self.ephemeral_time_wait[family]
            live = self.live[family]
            for key, sockets in counts.items():
                port, source, destination = _decode_tuple_key(family, key)
                rows = live.get(key)
                if rows is None:
                    uses.append(
                        DestinationUse(
                            family, source, destination, port, sockets, time_wait.get(key, 0)
                        )
                    )
                    continue
                stalls = rows.finish(
                    self.rows, functools.partial(liveinfo.endpoints_of, family=family)
                )
                timed = rows.rtt_timed
                uses.append(
                    DestinationUse(
                        family,
                        source,
                        destination,
                        port,
                        sockets,
                        time_wait.get(key, 0),
                        established=stalls.connections,
                        rtt_connections=timed,
                        rtt_mean_seconds=rows.sums["rtt"] / timed / 1e6 if timed else None,
                        rtt_max_seconds=rows.maxima["rtt"] / 1e6 if timed else None,
                        retransmits_in_flight=stalls.retransmits_in_flight,
                        segments_retransmitted=stalls.segments_retransmitted,
                        segments_sent=stalls.segments_sent,
                        stalls=stalls,
                    )
                )
        uses.sort(key=lambda use: (-use.sockets, use.family, use.source, use.address, use.port))
        return tuple(uses)

    def _syn_sent(self) -> tuple[Destination, ...]:
        destinations: list[Destination] = []
        for (family, key), count in self.syn_sent.items():
            port, _, address = _decode_tuple_key(family, key)
            destinations.append(Destination(family, address, port, count))
        destinations.sort(key=lambda d: (-d.sockets, d.family, d.address, d.port))
        return tuple(destinations)


def _listener_drops(data: memoryview | bytes, offset: int, msg_len: int) -> int | None:
    """sk_drops from a listener's INET_DIAG_SKMEMINFO; None when the message has none."""
    found = find_attribute(data, offset + INET_DIAG_MSG_MIN, offset + msg_len, INET_DIAG_SKMEMINFO)
    if found is None or found[1] < (SK_MEMINFO_DROPS + 1) * 4:
        return None
    drops: int = _U32.unpack_from(data, found[0] + SK_MEMINFO_DROPS * 4)[0]
    return drops


def _decode_tuple_key(family: str, key: bytes) -> tuple[int, str, str]:
    """(destination port, source, destination) from a dport + src[16] + dst[16] key."""
    addr_len = ADDRESS_LENGTH[family]
    port = (key[0] << 8) | key[1]
    return port, _address(family, key[2 : 2 + addr_len]), _address(family, key[18 : 18 + addr_len])


def _owner_of_request(
    family: str,
    address: bytes,
    port: int,
    exact: set[tuple[str, bytes, int]],
) -> tuple[str, bytes, int] | None:
    wildcard = bytes(ADDRESS_LENGTH[family])
    for candidate in ((family, address, port), (family, wildcard, port)):
        if candidate in exact:
            return candidate
    if family == "ipv4":
        # Not seen on 6.18 (such request sockets are IPv6 with a ::ffff: address); kept so a
        # kernel that reports them as IPv4 still finds its dual-stack listener.
        mapped = bytes(10) + b"\xff\xff" + address
        for candidate in (("ipv6", mapped, port), ("ipv6", bytes(16), port)):
            if candidate in exact:
                return candidate
    return None


def _address(family: str, raw: bytes) -> str:
    return socket.inet_ntop(FAMILY_NUMBER[family], raw)


# A receive function: fills the buffer, returns the byte count. Injectable for tests.
Receiver = Callable[[memoryview], int]
