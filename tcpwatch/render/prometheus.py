"""Prometheus exposition of the latest snapshots and findings (a custom collector).

collect() builds every family afresh from an immutable ExportState, so a scrape never sees half a
poll and no labelled series outlives the socket or finding it described.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tcpwatch import __version__
from tcpwatch.endpoints import endpoint, ports_available
from tcpwatch.model import FAMILIES, STATES, Snapshot
from tcpwatch.render.connections import connection_families
from tcpwatch.render.owners import owner_families
from tcpwatch.state import POLL_BUCKETS, ExportState

# Kernel counter (nstat name) -> exported counter name and help.
KERNEL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "TcpExtListenOverflows",
        "tcpwatch_listen_overflows",
        "Connections dropped because a listener's accept queue was full (TcpExtListenOverflows).",
    ),
    (
        "TcpExtListenDrops",
        "tcpwatch_listen_drops",
        "SYNs and final ACKs dropped on the listen path, overflows included (TcpExtListenDrops).",
    ),
    (
        "TcpExtTCPReqQFullDrop",
        "tcpwatch_syn_queue_drops",
        "SYNs dropped because the SYN queue was full and syncookies were off "
        "(TcpExtTCPReqQFullDrop).",
    ),
    (
        "TcpExtTCPReqQFullDoCookies",
        "tcpwatch_syn_queue_cookies",
        "SYNs answered with a syncookie because the SYN queue was full "
        "(TcpExtTCPReqQFullDoCookies).",
    ),
    ("TcpExtSyncookiesSent", "tcpwatch_syncookies_sent", "Syncookies sent (TcpExtSyncookiesSent)."),
    (
        "TcpExtSyncookiesRecv",
        "tcpwatch_syncookies_received",
        "Valid syncookies received back (TcpExtSyncookiesRecv).",
    ),
    (
        "TcpExtSyncookiesFailed",
        "tcpwatch_syncookies_failed",
        "Invalid syncookies received (TcpExtSyncookiesFailed).",
    ),
    (
        "TcpExtTCPTimeWaitOverflow",
        "tcpwatch_timewait_overflows",
        "TIME_WAIT sockets destroyed at once because tcp_max_tw_buckets was reached "
        "(TcpExtTCPTimeWaitOverflow).",
    ),
)

CACHED = " Cached: values are from the latest poll (see tcpwatch_last_poll_timestamp_seconds)."


def _gauge(name: str, doc: str, labels: Sequence[str], cached: bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc + (CACHED if cached else ""), labels=labels)


def process_socket_counts(snapshot: Snapshot) -> Counter[tuple[str, str]]:
    """(process name, state) -> attributed sockets, listeners included."""
    counts: Counter[tuple[str, str]] = Counter()
    if snapshot.sockets is None or snapshot.attribution is None:
        return counts
    owners = snapshot.attribution.owners
    for listener in snapshot.sockets.listeners:
        owner = owners.get(listener.inode)
        if owner is not None:
            counts[(owner.name, "listen")] += 1
    for state, inodes in snapshot.sockets.inodes_by_state.items():
        for inode in inodes:
            owner = owners.get(inode)
            if owner is not None:
                counts[(owner.name, state)] += 1
    return counts


class TcpwatchCollector(Collector):
    def __init__(self, state: Callable[[], ExportState | None]) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        # Describing nothing keeps registration from calling collect() (and so from polling).
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield from _build_info()
        if state is None:
            return
        yield from _netns_families(state)
        yield from _socket_families(state)
        yield from _listener_families(state)
        yield from _kernel_families(state)
        yield from connection_families(state)
        yield from _port_families(state)
        yield from _process_families(state)
        yield from owner_families(state)
        yield from _finding_families(state)
        yield from _self_families(state)


def _build_info() -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "tcpwatch_build_info", "tcpwatch version; always 1.", labels=["version"]
    )
    info.add_metric([__version__], 1)
    yield info


def _netns_families(state: ExportState) -> Iterator[Metric]:
    info = _gauge(
        "tcpwatch_netns_info",
        "1 for each polled network namespace; container, pod, pod_namespace and pod_uid name who "
        "lives there when a member process' cgroup tells (empty otherwise). Join on netns.",
        ["netns", "inode", "container", "pod", "pod_namespace", "pod_uid"],
        state.cached,
    )
    for snap in state.snapshots:
        identity = snap.identity
        info.add_metric(
            [
                snap.netns,
                str(identity.inode) if identity.inode else "",
                identity.container,
                identity.pod,
                identity.pod_namespace,
                identity.pod_uid,
            ],
            1,
        )
    polled = GaugeMetricFamily(
        "tcpwatch_netns_polled", "Network namespaces polled in the latest poll."
    )
    polled.add_metric([], len(state.snapshots))
    yield from (info, polled)


def _socket_families(state: ExportState) -> Iterator[Metric]:
    sockets = _gauge(
        "tcpwatch_sockets",
        "TCP sockets by address family and state, as `ss -tan` counts them.",
        ["netns", "family", "state"],
        state.cached,
    )
    dumped = _gauge(
        "tcpwatch_established_dumped",
        "1 if this poll counted ESTABLISHED by dumping every such socket (collect.established: "
        "dumped, or derived mode falling back because connections came or went during the "
        "dumps), 0 if it derived inbound ESTABLISHED from sockstat.",
        ["netns"],
        state.cached,
    )
    for snap in state.snapshots:
        if snap.sockets is None:
            continue
        for family in FAMILIES:
            by_state = snap.sockets.counts.get(family, {})
            for name in STATES:
                sockets.add_metric([snap.netns, family, name], by_state.get(name, 0))
        dumped.add_metric([snap.netns], 1 if snap.sockets.established_method == "dumped" else 0)
    yield sockets
    yield dumped


def _listener_families(state: ExportState) -> Iterator[Metric]:
    labels = ["netns", "address", "port", "socket"]
    length = _gauge(
        "tcpwatch_listen_queue_length",
        "Connections waiting in a listener's accept queue (`ss -lnt` Recv-Q). socket tells apart "
        "SO_REUSEPORT sockets sharing one address:port.",
        labels,
        state.cached,
    )
    maximum = _gauge(
        "tcpwatch_listen_queue_max",
        "A listener's effective accept-queue limit: min(listen() backlog, net.core.somaxconn) "
        "(`ss -lnt` Send-Q).",
        labels,
        state.cached,
    )
    syn_recv = _gauge(
        "tcpwatch_listen_syn_recv",
        "Half-open connections (request sockets in SYN_RECV) in a listener's SYN queue.",
        labels,
        state.cached,
    )
    info = _gauge(
        "tcpwatch_listener_info",
        "The process owning a listening socket; always 1.",
        [*labels, "process", "pid"],
        state.cached,
    )
    for snap in state.snapshots:
        if snap.sockets is None:
            continue
        for listener in snap.sockets.listeners:
            values = [snap.netns, listener.address, str(listener.port), str(listener.socket_index)]
            length.add_metric(values, listener.queue_length)
            maximum.add_metric(values, listener.queue_max)
            syn_recv.add_metric(values, listener.syn_recv)
            owner = snap.attribution.owner(listener.inode) if snap.attribution else None
            if owner is not None:
                info.add_metric([*values, owner.name, str(owner.pid)], 1)
    yield from (length, maximum, syn_recv, info)


def _kernel_families(state: ExportState) -> Iterator[Metric]:
    families = {
        name: CounterMetricFamily(name, doc, labels=["netns"]) for _, name, doc in KERNEL_COUNTERS
    }
    orphans = _gauge(
        "tcpwatch_orphan_sockets",
        "TCP sockets closed by their application but not yet finished (/proc/net/sockstat orphan).",
        ["netns"],
        state.cached,
    )
    memory = _gauge(
        "tcpwatch_tcp_memory_bytes",
        "Memory the kernel accounts to TCP sockets (/proc/net/sockstat mem, pages x page size); "
        "compare with net.ipv4.tcp_mem, which is in pages.",
        ["netns"],
        state.cached,
    )
    sysctls = _gauge(
        "tcpwatch_sysctl",
        "TCP tunables under /proc/sys/net. Multi-valued ones get one series per field, named "
        "with a suffix (net.ipv4.ip_local_port_range.min/.max, "
        "net.ipv4.tcp_mem.min/.pressure/.max).",
        ["netns", "name"],
        state.cached,
    )
    page_size = os.sysconf("SC_PAGE_SIZE")
    # tcp_mem and sockstat's mem are in pages: 4 KiB on x86-64, 16 or 64 KiB on some arm64 and
    # ppc64 kernels, so a dashboard multiplying by 4096 is wrong there.
    page = GaugeMetricFamily(
        "tcpwatch_page_size_bytes",
        "The kernel's page size (sysconf PAGE_SIZE): the unit of net.ipv4.tcp_mem.",
    )
    page.add_metric([], page_size)
    for snap in state.snapshots:
        if snap.counters is not None:
            for nstat_name, name, _ in KERNEL_COUNTERS:
                value = snap.counters.get(nstat_name)
                if value is not None:
                    families[name].add_metric([snap.netns], value)
        if snap.sockstat is not None:
            orphans.add_metric([snap.netns], snap.sockstat.orphan)
            memory.add_metric([snap.netns], snap.sockstat.memory_pages * page_size)
        if snap.sysctls is not None:
            for name, value in snap.sysctls.named_fields():
                sysctls.add_metric([snap.netns, name], value)
    yield from families.values()
    yield from (orphans, memory, page, sysctls)


def _port_families(state: ExportState) -> Iterator[Metric]:
    used = _gauge(
        "tcpwatch_ephemeral_ports_used",
        "Sockets on ephemeral local ports (inside net.ipv4.ip_local_port_range) towards one "
        "destination address:port from one source address, TIME_WAIT included; the top "
        "destinations only.",
        ["netns", "source", "destination"],
        state.cached,
    )
    size = _gauge(
        "tcpwatch_ephemeral_port_range_size",
        "Ports the kernel can pick for outgoing connections: ip_local_port_range minus "
        "ip_local_reserved_ports inside it. Each (source, destination) can use at most this many.",
        ["netns"],
        state.cached,
    )
    destinations = _gauge(
        "tcpwatch_ephemeral_destinations",
        "Distinct (source, destination) pairs using ephemeral ports, before the top-N cut.",
        ["netns"],
        state.cached,
    )
    scanned = _gauge(
        "tcpwatch_ephemeral_scan_timestamp_seconds",
        "Unix time of the per-destination scan tcpwatch_ephemeral_ports_used comes from; serve "
        "repeats it every collect.destinations_interval seconds, not every poll.",
        ["netns"],
        state.cached,
    )
    for snap in state.snapshots:
        if snap.sockets is not None and snap.sockets.destinations_at:
            scanned.add_metric([snap.netns], snap.sockets.destinations_at)
        if snap.sysctls is not None and snap.sysctls.port_range is not None:
            low, high = snap.sysctls.port_range
            # Arithmetic over the ranges: a loop over a kernel-supplied range could take minutes.
            available = ports_available(low, high, snap.sysctls.reserved_ports)
            size.add_metric([snap.netns], available)
        if snap.sockets is None:
            continue
        destinations.add_metric([snap.netns], len(snap.sockets.ephemeral_use))
        for use in snap.sockets.ephemeral_use[: state.top_destinations]:
            used.add_metric([snap.netns, use.source, endpoint(use.address, use.port)], use.sockets)
    yield from (used, size, destinations, scanned)


def _process_families(state: ExportState) -> Iterator[Metric]:
    family = _gauge(
        "tcpwatch_process_sockets",
        "Sockets attributed to a process name (listeners and the states chosen in "
        "collect.attribute_states), for the processes holding the most.",
        ["netns", "process", "state"],
        state.cached,
    )
    complete = _gauge(
        "tcpwatch_process_scan_complete",
        "1 if the latest /proc/*/fd scan found the owner of every wanted socket or read every "
        "process; 0 if processes were denied to it (missing CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH) "
        "or it hit collect.process_scan_timeout.",
        ["netns"],
        state.cached,
    )
    denied = _gauge(
        "tcpwatch_process_scan_denied_processes",
        "Processes whose file descriptors the latest scan was not allowed to read.",
        ["netns"],
        state.cached,
    )
    for snap in state.snapshots:
        if snap.attribution is not None:
            complete.add_metric([snap.netns], 1 if snap.attribution.complete else 0)
            denied.add_metric([snap.netns], snap.attribution.processes_denied)
        counts = process_socket_counts(snap)
        per_process: Counter[str] = Counter()
        for (name, _), count in counts.items():
            per_process[name] += count
        top = {name for name, _ in per_process.most_common(state.top_processes)}
        for (name, socket_state), count in sorted(counts.items()):
            if name in top:
                family.add_metric([snap.netns, name, socket_state], count)
    yield from (family, complete, denied)


def _finding_families(state: ExportState) -> Iterator[Metric]:
    family = _gauge(
        "tcpwatch_finding",
        "1 for each active finding; id and slug name the rule (docs/rules/<id>-<slug>.md), "
        "subject the listener, process or destination it is about (empty when host-wide).",
        ["netns", "id", "slug", "severity", "subject"],
        state.cached,
    )
    seen: set[tuple[str, ...]] = set()
    for finding in state.findings:
        labels = (finding.netns, finding.rule_id, finding.slug, finding.severity, finding.subject)
        if labels not in seen:
            seen.add(labels)
            family.add_metric(list(labels), 1)
    yield family


def _self_families(state: ExportState) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "tcpwatch_source_up",
        "1 if the source worked in the latest poll, 0 if it failed (its metrics are then absent).",
        labels=["netns", "source"],
    )
    duration = GaugeMetricFamily(
        "tcpwatch_source_duration_seconds",
        "How long the source took in the latest poll.",
        labels=["netns", "source"],
    )
    degraded = GaugeMetricFamily(
        "tcpwatch_source_degraded",
        "Fields the source left out in the latest poll because they were malformed or "
        "unreadable (one per sysctl file); the source is still up. 0 when it read everything.",
        labels=["netns", "source"],
    )
    errors = CounterMetricFamily(
        "tcpwatch_source_errors",
        "Polls in which the source failed, since tcpwatch started.",
        labels=["netns", "source"],
    )
    for snap in state.snapshots:
        for status in snap.sources:
            up.add_metric([snap.netns, status.name], 1 if status.ok else 0)
            duration.add_metric([snap.netns, status.name], status.duration_seconds)
            degraded.add_metric([snap.netns, status.name], len(status.skipped))
        for source in state.source_names:
            failures = state.source_errors.get((snap.netns, source), 0)
            errors.add_metric([snap.netns, source], failures)
    last = GaugeMetricFamily(
        "tcpwatch_last_poll_timestamp_seconds",
        "Unix time at which the latest poll started.",
    )
    last.add_metric([], state.last_poll)
    histogram = HistogramMetricFamily(
        "tcpwatch_poll_duration_seconds", "How long whole polls took (all sources, all namespaces)."
    )
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    bounds = (*POLL_BUCKETS, float("inf"))
    for bound, count in zip(bounds, state.poll_durations.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    histogram.add_metric([], buckets, state.poll_durations.total)
    yield from (up, degraded, duration, errors, last, histogram)


def make_registry(
    state: Callable[[], ExportState | None], include_process: bool = True
) -> CollectorRegistry:
    """A private registry: tcpwatch's collector plus the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpwatchCollector(state))
    if include_process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def render(state: ExportState, include_process: bool = True) -> bytes:
    return generate_latest(make_registry(lambda: state, include_process))
