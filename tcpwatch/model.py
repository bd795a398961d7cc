"""The snapshot: what one poll of one network namespace saw.

Every consumer (rules, exporter, report) reads these frozen dataclasses and nothing else.
Mappings inside them are built once by a source and never mutated afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from tcpwatch.stalls import ClosedWaits, InboundScan, Stalls
from tcpwatch.tracepoint_stats import ClearedClose, TracepointStats

# Exported state names, in the kernel's numbering order (TCP_ESTABLISHED = 1 ... TCP_CLOSING = 11).
STATES: tuple[str, ...] = (
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "listen",
    "closing",
)
FAMILIES: tuple[str, ...] = ("ipv4", "ipv6")


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


@dataclass(frozen=True, slots=True)
class SockStat:
    """/proc/net/sockstat and sockstat6, TCP lines."""

    inuse_ipv4: int  # full TCP sockets in the hash tables (no TIME_WAIT, no request sockets)
    inuse_ipv6: int
    orphan: int
    time_wait: int  # both families; FIN_WAIT2 timewait sockets included
    alloc: int
    memory_pages: int


@dataclass(frozen=True, slots=True)
class KernelCounters:
    """/proc/net/netstat and /proc/net/snmp counters, with nstat names (TcpExtListenOverflows)."""

    values: Mapping[str, int]

    def get(self, name: str) -> int | None:
        return self.values.get(name)


# Sysctls holding several integers, and what each field is called (the suffix of its series in
# tcpwatch_sysctl). Every other sysctl holds exactly one integer.
MULTI_FIELD_SUFFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "net.ipv4.ip_local_port_range": ("min", "max"),
        "net.ipv4.tcp_mem": ("min", "pressure", "max"),
        "net.ipv4.tcp_rmem": ("min", "default", "max"),
        "net.ipv4.tcp_wmem": ("min", "default", "max"),
    }
)


@dataclass(frozen=True, slots=True)
class Sysctls:
    """TCP tunables. A sysctl the kernel lacks is absent from ``values``."""

    values: Mapping[str, tuple[int, ...]]  # dotted name -> its integer fields
    reserved_ports: tuple[tuple[int, int], ...] = ()  # ip_local_reserved_ports as ranges
    # False when the file exists but could not be used: which ports are reserved is unknown,
    # and reserved_ports (then empty) must not be read as "none".
    reserved_ports_known: bool = True

    def get(self, name: str, index: int = 0) -> int | None:
        fields = self.values.get(name)
        if fields is None or index >= len(fields):
            return None
        return fields[index]

    @property
    def port_range(self) -> tuple[int, int] | None:
        fields = self.values.get("net.ipv4.ip_local_port_range")
        if fields is None or len(fields) != 2:
            return None
        return fields[0], fields[1]

    def port_reserved(self, port: int) -> bool:
        """Whether ``port`` is reserved; False also when that is unknown (reserved_ports_known)."""
        return any(low <= port <= high for low, high in self.reserved_ports)

    def named_fields(self) -> tuple[tuple[str, int], ...]:
        """Each field under its own name, sorted by sysctl: ``net.core.somaxconn`` for a
        one-field sysctl, ``net.ipv4.tcp_mem.min`` / ``.pressure`` / ``.max`` for the fields of
        :data:`MULTI_FIELD_SUFFIXES`. A value with the wrong number of fields is left out."""
        named: list[tuple[str, int]] = []
        for name, fields in sorted(self.values.items()):
            suffixes = MULTI_FIELD_SUFFIXES.get(name)
            if suffixes is None or len(suffixes) != len(fields):
                if len(fields) == 1:
                    named.append((name, fields[0]))
                continue
            pairs = zip(suffixes, fields, strict=True)
            named.extend((f"{name}.{suffix}", value) for suffix, value in pairs)
        return tuple(named)


@dataclass(frozen=True, slots=True)
class PersistedSysctl:
    """One assignment in a sysctl configuration file (/etc/sysctl.conf, sysctl.d drop-ins)."""

    path: str  # as on the host, e.g. "/etc/sysctl.d/99-sysctl.conf"
    line: int  # 1-based
    name: str  # dotted, "/" separators normalised to "."; a leading "-" (ignore errors) removed
    value: str  # as written, surrounding whitespace removed


def lines_for(persisted: Iterable[PersistedSysctl], name: str) -> tuple[PersistedSysctl, ...]:
    """The assignments of one dotted name, in application order."""
    return tuple(entry for entry in persisted if entry.name == name)


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    name: str


@dataclass(frozen=True, slots=True)
class Attribution:
    """Socket inode -> owning process, from one scan of /proc/*/fd."""

    owners: Mapping[int, ProcessRef]
    processes_scanned: int
    complete: bool  # every wanted inode was found or every process was scanned
    processes_denied: int = 0  # processes whose fds we may not read (no CAP_SYS_PTRACE...)
    # Where each owner holds the socket (inode -> (pid, fd name)): the next scan re-checks these
    # with one readlink each instead of walking every process' fd table again.
    locations: Mapping[int, tuple[int, str]] = field(default_factory=dict)
    confirmed: int = 0  # owners found again at their known location, without a walk
    seen: frozenset[int] = frozenset()  # attributed-state inodes seen: the next poll's candidates
    walked: frozenset[int] = frozenset()  # pids a cut walk read: the next walk reads the rest first

    def owner(self, inode: int) -> ProcessRef | None:
        return self.owners.get(inode)


@dataclass(frozen=True, slots=True)
class OwnerProcess:
    """A socket owner worth describing (a listener's owner, a top CLOSE_WAIT holder), with psutil.

    ``max_fds`` / ``max_fds_hard`` are its RLIMIT_NOFILE soft and hard limits; None when the
    limit is unlimited (RLIM_INFINITY). ``open_fds`` counts every descriptor, sockets or not.
    """

    pid: int
    name: str  # /proc/PID/comm, as process attribution (and `ss -p`) shows it
    user: str  # the user name, or the uid in decimal when it has none
    started_at: float  # unix time
    open_fds: int
    max_fds: int | None
    max_fds_hard: int | None
    listeners: int  # listening sockets it owns, across the polled namespaces
    close_wait: int  # CLOSE_WAIT sockets attributed to it, across the polled namespaces


@dataclass(frozen=True, slots=True)
class OwnerProcesses:
    """The owners of interest of one poll, described (pid -> description)."""

    processes: Mapping[int, OwnerProcess]
    wanted: int  # owners chosen to describe (bounded)
    failed: int = 0  # of those: exited meanwhile or denied to us
    skipped: str = ""  # why none was described (another procfs root), "" otherwise

    def get(self, pid: int) -> OwnerProcess | None:
        return self.processes.get(pid)


@dataclass(frozen=True, slots=True)
class SourceStatus:
    name: str
    ok: bool
    duration_seconds: float
    error: str | None = None
    # A source that worked but left fields out (a malformed or unreadable sysctl file): one note
    # per field, naming it and why. ok stays True; tcpwatch_source_degraded counts these.
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NetnsIdentity:
    """Who lives in a namespace, when its member processes tell (container runtimes' cgroups)."""

    inode: int = 0
    container: str = ""
    pod: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One network namespace at one instant. A source that failed leaves its field None."""

    netns: str
    taken_at: float  # unix time
    sockets: SocketTable | None
    counters: KernelCounters | None
    sockstat: SockStat | None
    sysctls: Sysctls | None
    attribution: Attribution | None
    sources: tuple[SourceStatus, ...] = field(default_factory=tuple)
    identity: NetnsIdentity = field(default_factory=NetnsIdentity)
    owner_processes: OwnerProcesses | None = None  # host-wide: the same value in every snapshot
    # Closed connections heard since the namespace's destroy listener started (the long-lived
    # source "lifecycle"; serve and check --window only).
    connections: LifecycleStats | None = None
    # Host-wide, the same in every snapshot: the assignments in the host's sysctl files (the
    # source "sysctl_files"), in the order they are applied at boot.
    persisted_sysctls: tuple[PersistedSysctl, ...] | None = None
    inbound: InboundScan | None = None  # the listeners' live connections (source "inbound")
    tracepoints: TracepointStats | None = None  # since the host's tracepoint reader started

    def source_ok(self, name: str) -> bool:
        return any(status.name == name and status.ok for status in self.sources)


# --- Connection lifecycle: closed connections heard on the socket-destroy multicast ------------
# Built by tcpwatch/sources/lifecycle*.py; meanings in docs/connections.md.

DIRECTIONS: tuple[str, ...] = ("inbound", "outbound")
# ok: handshake completed; timeout: no answer (segs_in 0); refused: answered (RST) before the
# handshake completed; aborted: a connect that never completed and whose port and counters the
# kernel cleared before reporting (a blocking connect() that failed, or a failed connect closed
# with SO_LINGER 0, as proxies do). A connection that worked and was then closed with SO_LINGER 0
# is ok, under the bare address.
OUTCOMES: tuple[str, ...] = ("ok", "timeout", "refused", "aborted")
# Upper bounds of the RTT histogram, in 1-3 steps (10^k and 3 x 10^k s): loopback and veth
# (under 30 us) to intercontinental (1 s); 11 bounds, 14 series with +Inf, sum and count. Chosen
# by measurement (docs/metrics.md, "Latency buckets"): a duration histogram elsewhere extends the
# same steps upwards (3, 10, 30 s) rather than inventing its own.
RTT_BUCKETS_SECONDS: tuple[float, ...] = (
    0.00001,
    0.00003,
    0.0001,
    0.0003,
    0.001,
    0.003,
    0.01,
    0.03,
    0.1,
    0.3,
    1.0,
)
PEER_OTHER = "other"  # every peer beyond the table's limit, per direction


@dataclass(frozen=True, slots=True)
class PeerStats:
    """Cumulative counts for the connections of one (direction, peer) that closed so far."""

    direction: str  # one of DIRECTIONS
    peer: str  # "10.0.0.5:5432", "[::1]:8080", a bare address (port cleared), or PEER_OTHER
    closed: Mapping[str, int]  # outcome -> connections closed (every OUTCOMES key present)
    # Smoothed RTT at close of the connections with an RTT sample: per bucket of
    # RTT_BUCKETS_SECONDS, then one more for above the last bound (not cumulative).
    rtt_buckets: tuple[int, ...]
    rtt_count: int
    rtt_sum_seconds: float
    segments_sent: int  # tcpi_segs_out
    segments_retransmitted: int  # tcpi_total_retrans
    bytes_sent: int  # tcpi_bytes_acked: bytes the peer acknowledged (SYN and FIN count one each)
    bytes_received: int  # tcpi_bytes_received (a received FIN counts one)
    waits: ClosedWaits = field(default_factory=ClosedWaits)  # busy, limited, zero windows

    def rtt_cumulative(self) -> tuple[int, ...]:
        """Counts per upper bound, cumulative, the last one being +Inf (Prometheus' shape)."""
        total = 0
        cumulative: list[int] = []
        for count in self.rtt_buckets:
            total += count
            cumulative.append(total)
        return tuple(cumulative)


def add_peer_stats(total: PeerStats | None, delta: PeerStats, peer: str | None = None) -> PeerStats:
    """``total`` + ``delta`` (counts of the same row; ``peer`` renames the result)."""
    name = peer if peer is not None else delta.peer
    if total is None:
        return delta if name == delta.peer else replace(delta, peer=name)
    return PeerStats(
        direction=total.direction,
        peer=name,
        closed={o: total.closed.get(o, 0) + delta.closed.get(o, 0) for o in OUTCOMES},
        rtt_buckets=tuple(a + b for a, b in zip(total.rtt_buckets, delta.rtt_buckets, strict=True)),
        rtt_count=total.rtt_count + delta.rtt_count,
        rtt_sum_seconds=total.rtt_sum_seconds + delta.rtt_sum_seconds,
        segments_sent=total.segments_sent + delta.segments_sent,
        segments_retransmitted=total.segments_retransmitted + delta.segments_retransmitted,
        bytes_sent=total.bytes_sent + delta.bytes_sent,
        bytes_received=total.bytes_received + delta.bytes_received,
        waits=total.waits + delta.waits,
    )


@dataclass(frozen=True, slots=True)
class PeerActivity:
    """One tracked (direction, peer) of a namespace's destroy listener since the previous drain:
    what closed (``delta``, None: nothing) and its ``score`` at its last close (the listener keeps
    the busiest; peer_budget.py scores anew). PEER_OTHER: closes of pairs no longer tracked."""

    direction: str
    peer: str
    score: float
    delta: PeerStats | None


@dataclass(frozen=True, slots=True)
class LifecycleStats:
    """Everything one namespace's destroy listener aggregated since it started (cumulative).

    As the source drains it, ``activity`` holds what closed since the previous drain and
    ``peers`` is empty; the pipeline's host-wide budget (peer_budget.py) then fills ``peers``
    with the rows it gave this namespace, ``held`` with rows it keeps but does not export this
    poll, ``folded`` with the closes counted under PEER_OTHER or under no row, and sets
    ``activity`` to None."""

    peers: tuple[PeerStats, ...]  # sorted by direction, then peer; PEER_OTHER rows included
    events: int  # destroy messages received and parsed (every outcome, ignored ones too)
    ignored: int  # of them, sockets that never had a peer (closed listeners, never connected)
    malformed: int  # datagrams that could not be parsed (their remaining messages are skipped)
    # recv() failures with ENOBUFS: the kernel dropped one or more messages since the last read.
    overruns: int
    # Messages the kernel dropped at this socket for a full receive buffer (sk_drops, read with
    # SO_MEMINFO): exact. None when the kernel does not report it (before 4.12).
    lost: int | None
    max_peers: int  # the host-wide row budget (collect.connection_peers), PEER_OTHER included
    evicted: int  # rows this namespace gave up, to a busier peer or after being idle
    receive_buffer: int  # bytes the kernel granted the socket (SO_RCVBUF as read back)
    activity: tuple[PeerActivity, ...] | None = None
    # Rows remembered but not exported this poll: a row that comes back goes on from these.
    held: tuple[PeerStats, ...] = ()
    # direction -> closes not counted under their own peer's row (under PEER_OTHER, or under no
    # row when even PEER_OTHER did not fit the budget); cumulative; every direction once budgeted.
    folded: Mapping[str, int] = field(default_factory=dict)
    cleared: tuple[ClearedClose, ...] = ()  # as drained: failed connects the kernel cleared
    unjoined: int = 0  # once budgeted: of those, found by no tracepoint record (peer_join.py)
