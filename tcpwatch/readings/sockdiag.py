"""What the sockdiag source read: the sock_diag dumps of one namespace (the snapshot's
``sockets``), built by tcpwatch/sources/sockets.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tcpwatch.stalls import Stalls


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening socket and its two queues.

    ``socket_index`` tells apart SO_REUSEPORT sockets sharing one address:port: 0 for a lone
    listener, 0..N-1 in ascending inode order (creation order) within a reuseport group.
    ``drops`` is the socket's sk_drops (INET_DIAG_SKMEMINFO, `ss -ltnm` d<N>): every SYN or
    handshake the kernel dropped at this listener since it was created (accept-queue overflows,
    SYN-queue drops, ...). None when the kernel did not report it.
    """

    family: str
    address: str
    port: int
    queue_length: int  # accept queue now (sk_ack_backlog; `ss -lnt` Recv-Q)
    queue_max: int  # effective backlog (sk_max_ack_backlog; `ss -lnt` Send-Q)
    syn_recv: int  # request sockets (half-open connections) on this listener's port and address
    inode: int
    socket_index: int = 0
    drops: int | None = None


@dataclass(frozen=True, slots=True)
class DestinationUse:
    """Sockets bound to an ephemeral local port towards one (source, destination, port)."""

    family: str
    source: str
    address: str
    port: int
    sockets: int  # all states that hold the 4-tuple, TIME_WAIT included
    time_wait: int
    # Live ESTABLISHED connections' tcp_info (INET_DIAG_INFO of the per-destination dump; only
    # when ESTABLISHED is "derived", see sources/sockdiag.py). rtt_* cover the connections with
    # an RTT sample; the sums cover every ESTABLISHED connection counted in ``established``.
    established: int = 0  # ESTABLISHED connections whose tcp_info was read
    rtt_connections: int = 0  # of them, with an RTT sample (tcpi_rtt > 0)
    rtt_mean_seconds: float | None = None  # mean of their smoothed RTT (tcpi_rtt)
    rtt_max_seconds: float | None = None  # the largest smoothed RTT among them
    retransmits_in_flight: int = 0  # sum of tcpi_retrans: retransmitted segments not yet acked
    segments_retransmitted: int = 0  # sum of tcpi_total_retrans over each connection's life
    segments_sent: int = 0  # sum of tcpi_segs_out over each connection's life
    stalls: Stalls | None = None  # where their time went, their queues (None: no tcp_info read)


@dataclass(frozen=True, slots=True)
class Destination:
    """A remote endpoint with a count of sockets in one state towards it (e.g. SYN_SENT)."""

    family: str
    address: str
    port: int
    sockets: int


@dataclass(frozen=True, slots=True)
class SelfConnect:
    """A socket connected to itself (local address:port == remote address:port)."""

    family: str
    address: str
    port: int
    state: str
    inode: int


@dataclass(frozen=True, slots=True)
class SocketTable:
    """What the sock_diag dumps of one namespace yielded."""

    counts: Mapping[str, Mapping[str, int]]  # family -> state -> sockets (all STATES present)
    listeners: tuple[Listener, ...]
    ephemeral_use: tuple[DestinationUse, ...]  # sorted by sockets, largest first
    syn_sent: tuple[Destination, ...]  # SYN_SENT sockets per destination, largest first
    self_connects: tuple[SelfConnect, ...]
    inodes_by_state: Mapping[str, frozenset[int]]  # state -> inodes, states chosen for attribution
    # "derived": inbound ESTABLISHED = sockstat inuse minus the dumped full sockets; "dumped": all.
    established_method: str
    messages: int  # netlink messages parsed, a measure of the poll's cost
    # Unix time the per-destination data (ephemeral_use, established self-connects) was taken:
    # the poll's own time, or an earlier poll's when collect.destinations_interval spared it.
    destinations_at: float = 0.0
    churned: bool = False  # derived mode: the namespace moved during the dumps: ESTABLISHED dumped
    marks: tuple[int, ...] = ()  # quiet marks (ChurnMarks.signature) of dumps with nothing moving
    unchanged: bool = False  # marks found again: only the listeners dumped, the rest kept
    owner_uids: frozenset[int] = frozenset()  # idiag_uid of the sockets attribution looks for

    def total(self, state: str) -> int:
        return sum(by_state.get(state, 0) for by_state in self.counts.values())
