"""The snapshot: what one poll of one network namespace saw.

Every consumer (rules, exporter, report) reads these frozen dataclasses and nothing else.
Mappings inside them are built once by a source and never mutated afterwards. Each source's own
data classes live in tcpwatch/readings/<source>.py; this module holds the Snapshot that gathers
them and re-exports every name, so ``from tcpwatch.model import X`` is the one import to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tcpwatch.readings.counters import KernelCounters
from tcpwatch.readings.lifecycle import (
    DIRECTIONS,
    OUTCOMES,
    PEER_OTHER,
    RTT_BUCKETS_SECONDS,
    LifecycleStats,
    PeerActivity,
    PeerStats,
    add_peer_stats,
)
from tcpwatch.readings.owners import OwnerProcess, OwnerProcesses
from tcpwatch.readings.processes import Attribution, ProcessRef
from tcpwatch.readings.sockdiag import (
    Destination,
    DestinationUse,
    Listener,
    SelfConnect,
    SocketTable,
)
from tcpwatch.readings.sockstat import SockStat
from tcpwatch.readings.sysctl import MULTI_FIELD_SUFFIXES, Sysctls
from tcpwatch.readings.sysctl_files import PersistedSysctl, lines_for
from tcpwatch.stalls import ClosedWaits, InboundScan, Stalls
from tcpwatch.tracepoint_stats import ClearedClose, TracepointStats

# Every name of the snapshot's data, wherever it is defined: import them from here.
__all__ = [
    "DIRECTIONS",
    "FAMILIES",
    "MULTI_FIELD_SUFFIXES",
    "OUTCOMES",
    "PEER_OTHER",
    "RTT_BUCKETS_SECONDS",
    "STATES",
    "Attribution",
    "ClearedClose",
    "ClosedWaits",
    "Destination",
    "DestinationUse",
    "InboundScan",
    "KernelCounters",
    "LifecycleStats",
    "Listener",
    "NetnsIdentity",
    "OwnerProcess",
    "OwnerProcesses",
    "PeerActivity",
    "PeerStats",
    "PersistedSysctl",
    "ProcessRef",
    "SelfConnect",
    "Snapshot",
    "SockStat",
    "SocketTable",
    "SourceStatus",
    "Stalls",
    "Sysctls",
    "TracepointStats",
    "add_peer_stats",
    "lines_for",
]

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
