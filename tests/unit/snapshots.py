"""Build Snapshots and Windows for rule and report tests, no kernel involved.

``healthy_snapshot()`` is a host with the kernel's defaults (as on the 6.18 test VM) and a few
ordinary listeners; tests change one thing at a time with the keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tcpwatch.model import (
    OUTCOMES,
    RTT_BUCKETS_SECONDS,
    STATES,
    Attribution,
    Destination,
    DestinationUse,
    KernelCounters,
    LifecycleStats,
    Listener,
    OwnerProcess,
    OwnerProcesses,
    PeerStats,
    PersistedSysctl,
    ProcessRef,
    SelfConnect,
    Snapshot,
    SocketTable,
    SockStat,
    SourceStatus,
    Sysctls,
    lines_for,
)
from tcpwatch.rules import EvidenceValue, Finding, Rule, Severity, Thresholds, Window
from tcpwatch.stalls import ClosedWaits

DEFAULT_SYSCTLS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "net.core.somaxconn": (4096,),
        "net.core.netdev_max_backlog": (1000,),
        "net.ipv4.tcp_max_syn_backlog": (2048,),
        "net.ipv4.tcp_syncookies": (1,),
        "net.ipv4.tcp_abort_on_overflow": (0,),
        "net.ipv4.tcp_fin_timeout": (60,),
        "net.ipv4.tcp_tw_reuse": (2,),
        "net.ipv4.tcp_max_tw_buckets": (131072,),
        "net.ipv4.tcp_ehash_entries": (262144,),
        "net.ipv4.tcp_max_orphans": (131072,),
        "net.ipv4.ip_local_port_range": (32768, 60999),
        "net.ipv4.ip_unprivileged_port_start": (1024,),
        "net.ipv4.tcp_keepalive_time": (7200,),
        "net.ipv4.tcp_keepalive_intvl": (75,),
        "net.ipv4.tcp_keepalive_probes": (9,),
        "net.ipv4.tcp_mem": (287898, 383866, 575796),
    }
)

DEFAULT_COUNTERS: Mapping[str, int] = MappingProxyType(
    {
        "TcpExtListenOverflows": 0,
        "TcpExtListenDrops": 0,
        "TcpExtTCPReqQFullDrop": 0,
        "TcpExtTCPReqQFullDoCookies": 0,
        "TcpExtSyncookiesSent": 0,
        "TcpExtSyncookiesRecv": 0,
        "TcpExtSyncookiesFailed": 0,
        "TcpExtTCPTimeWaitOverflow": 0,
        "TcpExtTCPAbortOnMemory": 0,
        "TcpExtTCPMemoryPressures": 0,
    }
)

SSHD = ProcessRef(611, "sshd")
NGINX = ProcessRef(1234, "nginx")


def listener(
    port: int,
    address: str = "0.0.0.0",
    queue_length: int = 0,
    queue_max: int = 511,
    syn_recv: int = 0,
    inode: int | None = None,
    socket_index: int = 0,
    family: str | None = None,
) -> Listener:
    return Listener(
        family=family or ("ipv6" if ":" in address else "ipv4"),
        address=address,
        port=port,
        queue_length=queue_length,
        queue_max=queue_max,
        syn_recv=syn_recv,
        inode=inode if inode is not None else 10_000 + port,
        socket_index=socket_index,
    )


DEFAULT_LISTENERS: tuple[Listener, ...] = (
    listener(22, queue_max=128, inode=5001),
    listener(22, "::", queue_max=128, inode=5002),
    listener(80, queue_max=511, inode=5003),
)
DEFAULT_OWNERS: Mapping[int, ProcessRef] = MappingProxyType({5001: SSHD, 5002: SSHD, 5003: NGINX})


def sysctls(
    overrides: Mapping[str, tuple[int, ...] | None] | None = None,
    reserved_ports: tuple[tuple[int, int], ...] = (),
) -> Sysctls:
    """Default sysctls; an override of None removes the sysctl (the kernel lacks it)."""
    values = dict(DEFAULT_SYSCTLS)
    for name, value in (overrides or {}).items():
        if value is None:
            values.pop(name, None)
        else:
            values[name] = value
    return Sysctls(values=values, reserved_ports=reserved_ports)


def socket_table(
    listeners: Sequence[Listener] = DEFAULT_LISTENERS,
    states: Mapping[str, int] | None = None,
    ephemeral_use: Sequence[DestinationUse] = (),
    syn_sent: Sequence[Destination] = (),
    self_connects: Sequence[SelfConnect] = (),
    close_wait_inodes: Iterable[int] = (),
    syn_sent_inodes: Iterable[int] | None = None,
) -> SocketTable:
    """``syn_sent_inodes``: attribute SYN_SENT sockets too (``collect.attribute_states``)."""
    close_wait = frozenset(close_wait_inodes)
    ipv4 = dict.fromkeys(STATES, 0)
    ipv4["established"] = 12
    ipv4["listen"] = sum(1 for lsn in listeners if lsn.family == "ipv4")
    ipv4["close_wait"] = len(close_wait)
    ipv4["syn_sent"] = sum(d.sockets for d in syn_sent)
    ipv4.update(states or {})
    ipv6 = dict.fromkeys(STATES, 0)
    ipv6["listen"] = sum(1 for lsn in listeners if lsn.family == "ipv6")
    return SocketTable(
        counts={"ipv4": ipv4, "ipv6": ipv6},
        listeners=tuple(listeners),
        ephemeral_use=tuple(sorted(ephemeral_use, key=lambda use: -use.sockets)),
        syn_sent=tuple(sorted(syn_sent, key=lambda d: -d.sockets)),
        self_connects=tuple(self_connects),
        inodes_by_state={"close_wait": close_wait}
        | ({} if syn_sent_inodes is None else {"syn_sent": frozenset(syn_sent_inodes)}),
        established_method="derived",
        messages=40,
    )


def sockstat(orphan: int = 0, time_wait: int = 3, memory_pages: int = 165) -> SockStat:
    return SockStat(
        inuse_ipv4=15,
        inuse_ipv6=1,
        orphan=orphan,
        time_wait=time_wait,
        alloc=20,
        memory_pages=memory_pages,
    )


DEFAULT_TABLE = socket_table()
DEFAULT_SOCKSTAT = sockstat()


T0 = 1_700_000_000.0  # a window's start
T1 = T0 + 5.0  # and its end


def snapshot(
    *,
    netns: str = "host",
    taken_at: float = T1,
    sysctl_overrides: Mapping[str, tuple[int, ...] | None] | None = None,
    reserved_ports: tuple[tuple[int, int], ...] = (),
    sockets: SocketTable | None = DEFAULT_TABLE,
    counters: Mapping[str, int] | None = DEFAULT_COUNTERS,
    stat: SockStat | None = DEFAULT_SOCKSTAT,
    owners: Mapping[int, ProcessRef] | None = DEFAULT_OWNERS,
    attribution_complete: bool = True,
    no_sysctls: bool = False,
    failed_sources: Mapping[str, str] | None = None,
    described: Iterable[OwnerProcess] | None = None,
    connections: LifecycleStats | None = None,
) -> Snapshot:
    """A snapshot of a healthy host; pass None for a part to make its source fail.

    ``described``: the owners the ``owners`` source described (None: the source did not run).
    """
    failed = dict(failed_sources or {})
    sources = tuple(
        SourceStatus(name, name not in failed, 0.001, failed.get(name))
        for name in ("sysctl", "sockstat", "counters", "sockdiag", "processes")
    )
    return Snapshot(
        netns=netns,
        taken_at=taken_at,
        sockets=sockets,
        counters=None if counters is None else KernelCounters(dict(counters)),
        sockstat=stat,
        sysctls=None if no_sysctls else sysctls(sysctl_overrides, reserved_ports),
        attribution=None
        if owners is None
        else Attribution(dict(owners), processes_scanned=50, complete=attribution_complete),
        sources=sources,
        owner_processes=None if described is None else _described(tuple(described)),
        connections=connections,
    )


def peer_stats(
    peer: str,
    direction: str = "outbound",
    *,
    ok: int = 0,
    timeout: int = 0,
    refused: int = 0,
    aborted: int = 0,
    rtt_seconds: Sequence[float] = (),
    segments_sent: int = 0,
    segments_retransmitted: int = 0,
    bytes_sent: int = 0,
    bytes_received: int = 0,
    waits: ClosedWaits | None = None,
) -> PeerStats:
    """One (direction, peer) row of the destroy listener's table: cumulative counts."""
    closed = {"ok": ok, "timeout": timeout, "refused": refused, "aborted": aborted}
    assert set(closed) == set(OUTCOMES)
    buckets = [0] * (len(RTT_BUCKETS_SECONDS) + 1)
    for rtt in rtt_seconds:
        buckets[next((i for i, b in enumerate(RTT_BUCKETS_SECONDS) if rtt <= b), -1)] += 1
    return PeerStats(
        direction=direction,
        peer=peer,
        closed=closed,
        rtt_buckets=tuple(buckets),
        rtt_count=len(rtt_seconds),
        rtt_sum_seconds=float(sum(rtt_seconds)),
        segments_sent=segments_sent,
        segments_retransmitted=segments_retransmitted,
        bytes_sent=bytes_sent,
        bytes_received=bytes_received,
        waits=waits or ClosedWaits(),
    )


def lifecycle(peers: Sequence[PeerStats] = (), events: int | None = None) -> LifecycleStats:
    """What a namespace's destroy listener aggregated; ``events`` defaults to the peers' closes."""
    ordered = tuple(sorted(peers, key=lambda p: (p.direction, p.peer)))
    heard = sum(sum(p.closed.values()) for p in ordered)
    return LifecycleStats(
        peers=ordered,
        events=heard if events is None else events,
        ignored=0,
        malformed=0,
        overruns=0,
        lost=0,
        max_peers=100,
        evicted=0,
        receive_buffer=8 << 20,
    )


def _described(processes: tuple[OwnerProcess, ...]) -> OwnerProcesses:
    return OwnerProcesses({p.pid: p for p in processes}, wanted=len(processes))


def owner_process(
    pid: int,
    name: str,
    open_fds: int,
    max_fds: int | None = 1024,
    max_fds_hard: int | None = 524288,
    listeners: int = 1,
    close_wait: int = 0,
) -> OwnerProcess:
    """An owner as psutil would describe it (user www-data, started at T0 - 3600)."""
    return OwnerProcess(
        pid, name, "www-data", T0 - 3600, open_fds, max_fds, max_fds_hard, listeners, close_wait
    )


def counters_plus(increments: Mapping[str, int]) -> dict[str, int]:
    """Default counters with some grown by the given amounts."""
    values = dict(DEFAULT_COUNTERS)
    for name, amount in increments.items():
        values[name] = values.get(name, 0) + amount
    return values


def window(
    current: Snapshot,
    previous: Snapshot | None = None,
    close_wait_first_seen: Mapping[int, float] | None = None,
    persisted: Sequence[PersistedSysctl] = (),
) -> Window:
    return Window(current, previous, dict(close_wait_first_seen or {}), tuple(persisted))


def effective(persisted: Sequence[PersistedSysctl], name: str) -> PersistedSysctl | None:
    """The assignment that wins at boot for ``name`` (the last one applied), if any."""
    found = lines_for(persisted, name)
    return found[-1] if found else None


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """A rule's identity without a check, for tests that build a rule by hand."""

    id: str
    slug: str
    severity: Severity
    title: str

    def finding(
        self,
        window: Window,
        title: str,
        evidence: Mapping[str, EvidenceValue],
        remediation: str,
        subject: str = "",
        severity: Severity | None = None,
    ) -> Finding:
        doc = f"docs/rules/{self.id}-{self.slug}.md"
        made = Rule(self.id, self.slug, self.severity, self.title, (), _no_check, doc)
        return made.finding(window, title, evidence, remediation, subject, severity)


def _no_check(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    return iter(())


def carried_owners(snapshots: Sequence[Snapshot], *_: object, **__: object) -> tuple[Snapshot, ...]:
    """Stands in for tcpwatch.snapshot.attribute beside a fake poll whose snapshots carry their
    owners already (check runs the owner sources after the poll): nothing more to look for."""
    return tuple(snapshots)
