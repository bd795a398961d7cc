"""Families of the ``sockdiag`` source (the netlink dumps): sockets per state, listeners and
their queues, ephemeral ports per destination, and the live tcp_info of the connections towards
the top destinations (docs/connections.md)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from tcpwatch.endpoints import endpoint, ports_available
from tcpwatch.model import FAMILIES, STATES
from tcpwatch.render.families.base import NETNS, counter, family, gauge
from tcpwatch.state import ExportState


@family(source="sockdiag", order=20)
def socket_families(state: ExportState) -> Iterator[Metric]:
    sockets = gauge(
        "tcpwatch_sockets",
        "TCP sockets by address family and state, as `ss -tan` counts them.",
        ["netns", "family", "state"],
        state,
    )
    dumped = gauge(
        "tcpwatch_established_dumped",
        "1 if this poll counted ESTABLISHED by dumping every such socket (collect.established: "
        "dumped, or derived mode falling back because connections came or went during the "
        "dumps), 0 if it derived inbound ESTABLISHED from sockstat.",
        NETNS,
        state,
    )
    for snap in state.snapshots:
        if snap.sockets is None:
            continue
        for family_name in FAMILIES:
            by_state = snap.sockets.counts.get(family_name, {})
            for name in STATES:
                sockets.add_metric([snap.netns, family_name, name], by_state.get(name, 0))
        dumped.add_metric([snap.netns], 1 if snap.sockets.established_method == "dumped" else 0)
    yield sockets
    yield dumped


@family(source="sockdiag", order=30)
def listener_families(state: ExportState) -> Iterator[Metric]:
    labels = ["netns", "address", "port", "socket"]
    length = gauge(
        "tcpwatch_listen_queue_length",
        "Connections waiting in a listener's accept queue (`ss -lnt` Recv-Q). socket tells apart "
        "SO_REUSEPORT sockets sharing one address:port.",
        labels,
        state,
    )
    maximum = gauge(
        "tcpwatch_listen_queue_max",
        "A listener's effective accept-queue limit: min(listen() backlog, net.core.somaxconn) "
        "(`ss -lnt` Send-Q).",
        labels,
        state,
    )
    syn_recv = gauge(
        "tcpwatch_listen_syn_recv",
        "Half-open connections (request sockets in SYN_RECV) in a listener's SYN queue.",
        labels,
        state,
    )
    info = gauge(
        "tcpwatch_listener_info",
        "The process owning a listening socket; always 1. The one series carrying a pid: a "
        "restarted owner changes only this label. Join on (netns, address, port, socket) with "
        "group_left(process) for alerts, group_left(process, pid) for a person.",
        [*labels, "process", "pid"],
        state,
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


@family(source="sockdiag", order=31)
def listener_drop_families(state: ExportState) -> Iterator[Metric]:
    drops = counter(
        "tcpwatch_listener_drops",
        "Connection attempts the kernel dropped at a listening socket since it was created: "
        "accept-queue overflows, SYN-queue drops and other drops at the socket (its sk_drops, "
        "`ss -ltnm` d<N>). Resets when the listener is re-created. Absent when the kernel does "
        "not report it.",
        ["netns", "address", "port", "socket"],
    )
    for snap in state.snapshots:
        if snap.sockets is None:
            continue
        for listener in snap.sockets.listeners:
            if listener.drops is not None:
                values = [snap.netns, listener.address, str(listener.port)]
                drops.add_metric([*values, str(listener.socket_index)], listener.drops)
    yield drops


@family(source="sockdiag", order=52)
def live_destination_families(state: ExportState) -> Iterator[Metric]:
    labels = ["netns", "source", "destination"]
    scan = " From the latest per-destination scan (collect.live_tcp_info), top destinations only."

    def live(name: str, doc: str) -> GaugeMetricFamily:
        return gauge(name, doc + scan, labels, state)

    established = live(
        "tcpwatch_destination_established",
        "Live outbound ESTABLISHED connections towards a destination whose tcp_info was read.",
    )
    rtt = live(
        "tcpwatch_destination_rtt_seconds",
        "Mean smoothed RTT (tcpi_rtt) of the live connections towards a destination.",
    )
    rtt_max = live(
        "tcpwatch_destination_rtt_max_seconds",
        "Largest smoothed RTT among the live connections towards a destination.",
    )
    in_flight = live(
        "tcpwatch_destination_retransmits_in_flight",
        "Segments retransmitted and not yet acknowledged, summed over the live connections "
        "towards a destination (tcpi_retrans), now.",
    )
    retransmitted = live(
        "tcpwatch_destination_segments_retransmitted",
        "Segments the live connections towards a destination retransmitted over their lives "
        "(sum of tcpi_total_retrans; falls when connections close).",
    )
    sent = live(
        "tcpwatch_destination_segments_sent",
        "Segments the live connections towards a destination sent over their lives (sum of "
        "tcpi_segs_out; falls when connections close).",
    )
    for snap in state.snapshots:
        if snap.sockets is None:
            continue
        for use in snap.sockets.ephemeral_use[: state.top_destinations]:
            if not use.established:
                continue
            values = [snap.netns, use.source, endpoint(use.address, use.port)]
            established.add_metric(values, use.established)
            if use.rtt_mean_seconds is not None:
                rtt.add_metric(values, use.rtt_mean_seconds)
            if use.rtt_max_seconds is not None:
                rtt_max.add_metric(values, use.rtt_max_seconds)
            in_flight.add_metric(values, use.retransmits_in_flight)
            retransmitted.add_metric(values, use.segments_retransmitted)
            sent.add_metric(values, use.segments_sent)
    yield from (established, rtt, rtt_max, in_flight, retransmitted, sent)


@family(source="sockdiag", order=60)
def ephemeral_port_families(state: ExportState) -> Iterator[Metric]:
    used = gauge(
        "tcpwatch_ephemeral_ports_used",
        "Sockets on ephemeral local ports (inside net.ipv4.ip_local_port_range) towards one "
        "destination address:port from one source address, TIME_WAIT included; the top "
        "destinations only.",
        ["netns", "source", "destination"],
        state,
    )
    size = gauge(
        "tcpwatch_ephemeral_port_range_size",
        "Ports the kernel can pick for outgoing connections: ip_local_port_range minus "
        "ip_local_reserved_ports inside it. Each (source, destination) can use at most this many.",
        NETNS,
        state,
    )
    destinations = gauge(
        "tcpwatch_ephemeral_destinations",
        "Distinct (source, destination) pairs using ephemeral ports, before the top-N cut.",
        NETNS,
        state,
    )
    scanned = gauge(
        "tcpwatch_ephemeral_scan_timestamp_seconds",
        "Unix time of the per-destination scan tcpwatch_ephemeral_ports_used comes from; serve "
        "repeats it every collect.destinations_interval seconds, not every poll.",
        NETNS,
        state,
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
