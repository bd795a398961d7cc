"""Prometheus families of connection quality: closed connections per peer (the ``lifecycle``
source), the host's own TCP counters beside them (exact even when events are lost), and the live
per-destination RTT and retransmissions of the destination scan. docs/connections.md explains
them; render/prometheus.py yields them with the rest.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from tcpwatch.endpoints import endpoint
from tcpwatch.model import OUTCOMES, RTT_BUCKETS_SECONDS
from tcpwatch.state import ExportState

# Kernel counter (nstat name) -> exported counter name (without _total) and help.
HOST_TCP_COUNTERS: tuple[tuple[str, str, str], ...] = (
    (
        "TcpActiveOpens",
        "tcpwatch_tcp_active_opens",
        "Connections this namespace started: SYN_SENT entered (Tcp ActiveOpens).",
    ),
    (
        "TcpPassiveOpens",
        "tcpwatch_tcp_passive_opens",
        "Connections accepted by listeners: SYN_RECV entered from LISTEN (Tcp PassiveOpens).",
    ),
    (
        "TcpAttemptFails",
        "tcpwatch_tcp_attempt_fails",
        "Connection attempts that failed: SYN_SENT or SYN_RECV to CLOSED, or SYN_RECV back to "
        "LISTEN (Tcp AttemptFails).",
    ),
    (
        "TcpEstabResets",
        "tcpwatch_tcp_established_resets",
        "ESTABLISHED or CLOSE_WAIT connections ended by a reset (Tcp EstabResets).",
    ),
    ("TcpOutRsts", "tcpwatch_tcp_resets_sent", "TCP segments sent with RST (Tcp OutRsts)."),
    (
        "TcpOutSegs",
        "tcpwatch_tcp_segments_sent",
        "TCP segments sent, retransmissions excluded (Tcp OutSegs).",
    ),
    (
        "TcpRetransSegs",
        "tcpwatch_tcp_segments_retransmitted",
        "TCP segments retransmitted (Tcp RetransSegs).",
    ),
    (
        "TcpExtTCPTimeouts",
        "tcpwatch_tcp_retransmission_timeouts",
        "Retransmission timer expiries, SYN timeouts included (TcpExtTCPTimeouts).",
    ),
    (
        "TcpExtTCPSynRetrans",
        "tcpwatch_tcp_syn_retransmits",
        "SYN and SYN-ACK retransmissions (TcpExtTCPSynRetrans).",
    ),
    (
        "TcpExtTCPAbortOnTimeout",
        "tcpwatch_tcp_aborts_on_timeout",
        "Connections aborted after too many retransmissions or keepalive probes "
        "(TcpExtTCPAbortOnTimeout).",
    ),
    (
        "TcpExtTCPAbortOnData",
        "tcpwatch_tcp_aborts_on_data",
        "Connections reset because data arrived after the application closed "
        "(TcpExtTCPAbortOnData).",
    ),
    (
        "TcpExtTCPAbortOnClose",
        "tcpwatch_tcp_aborts_on_close",
        "Connections reset because the application closed with unread data "
        "(TcpExtTCPAbortOnClose).",
    ),
    (
        "TcpExtTCPAbortOnMemory",
        "tcpwatch_tcp_aborts_on_memory",
        "Connections aborted for lack of TCP memory or too many orphans (TcpExtTCPAbortOnMemory).",
    ),
    (
        "TcpExtTCPAbortOnLinger",
        "tcpwatch_tcp_aborts_on_linger",
        "Connections reset in FIN_WAIT2 after tcp_fin_timeout/TCP_LINGER2 "
        "(TcpExtTCPAbortOnLinger).",
    ),
)

PEER_LABELS = ["netns", "direction", "peer"]
CACHED = " Cached: values are from the latest poll (see tcpwatch_last_poll_timestamp_seconds)."


def connection_families(state: ExportState) -> Iterator[Metric]:
    yield from _closed_families(state)
    yield from _host_counter_families(state)
    yield from _live_families(state)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _closed_families(state: ExportState) -> Iterator[Metric]:
    closed = _counter(
        "tcpwatch_connections_closed",
        "TCP connections that closed, by direction (inbound: peer is the listener; outbound: "
        'peer is the destination), peer ("other": beyond collect.connection_peers) and outcome '
        "(ok, timeout, refused, aborted; docs/connections.md).",
        [*PEER_LABELS, "outcome"],
    )
    rtt = HistogramMetricFamily(
        "tcpwatch_connection_rtt_seconds",
        "Smoothed RTT (tcpi_rtt) of closed connections at close, those with an RTT sample.",
        labels=PEER_LABELS,
    )
    sent = _counter(
        "tcpwatch_connection_segments_sent",
        "Segments closed connections sent (tcpi_segs_out; SYNs and retransmissions included).",
        PEER_LABELS,
    )
    retransmitted = _counter(
        "tcpwatch_connection_segments_retransmitted",
        "Segments closed connections retransmitted (tcpi_total_retrans; SYN retransmissions "
        "included). Divide by tcpwatch_connection_segments_sent_total for the ratio.",
        PEER_LABELS,
    )
    bytes_sent = _counter(
        "tcpwatch_connection_bytes_sent",
        "Bytes closed connections sent that the peer acknowledged (tcpi_bytes_acked; SYN and "
        "FIN count one each).",
        PEER_LABELS,
    )
    bytes_received = _counter(
        "tcpwatch_connection_bytes_received",
        "Bytes closed connections received (tcpi_bytes_received; a FIN counts one).",
        PEER_LABELS,
    )
    events = _counter(
        "tcpwatch_lifecycle_events",
        "TCP socket-destroy events received since tcpwatch subscribed in this namespace, sockets "
        "that never had a peer included.",
        ["netns"],
    )
    lost = _counter(
        "tcpwatch_lifecycle_events_lost",
        "Destroy events the kernel dropped because tcpwatch's receive buffer was full (the "
        "socket's sk_drops; absent before Linux 4.12). Missing from every per-peer counter.",
        ["netns"],
    )
    folded = _counter(
        "tcpwatch_connections_folded",
        'Closed connections not counted under their own peer: under peer="other", or under no '
        "row when the host-wide budget (collect.connection_peers) had none left.",
        ["netns", "direction"],
    )
    bounds = [repr(bound) for bound in RTT_BUCKETS_SECONDS] + ["+Inf"]
    for snap in state.snapshots:
        stats = snap.connections
        if stats is None:
            continue
        events.add_metric([snap.netns], stats.events)
        for direction, count in sorted(stats.folded.items()):
            folded.add_metric([snap.netns, direction], count)
        if stats.lost is not None:
            lost.add_metric([snap.netns], stats.lost)
        for row in stats.peers:
            labels = [snap.netns, row.direction, row.peer]
            for outcome in OUTCOMES:
                closed.add_metric([*labels, outcome], row.closed.get(outcome, 0))
            cumulative = row.rtt_cumulative()
            rtt.add_metric(labels, list(zip(bounds, cumulative, strict=True)), row.rtt_sum_seconds)
            sent.add_metric(labels, row.segments_sent)
            retransmitted.add_metric(labels, row.segments_retransmitted)
            bytes_sent.add_metric(labels, row.bytes_sent)
            bytes_received.add_metric(labels, row.bytes_received)
    yield from (closed, rtt, sent, retransmitted, bytes_sent, bytes_received, events, lost)
    yield folded


def _host_counter_families(state: ExportState) -> Iterator[Metric]:
    families = {name: _counter(name, doc, ["netns"]) for _, name, doc in HOST_TCP_COUNTERS}
    for snap in state.snapshots:
        if snap.counters is None:
            continue
        for nstat_name, name, _ in HOST_TCP_COUNTERS:
            value = snap.counters.get(nstat_name)
            if value is not None:
                families[name].add_metric([snap.netns], value)
    yield from families.values()


def _live_families(state: ExportState) -> Iterator[Metric]:
    labels = ["netns", "source", "destination"]
    scan = " From the latest per-destination scan (collect.live_tcp_info), top destinations only."
    cached = CACHED if state.cached else ""

    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc + scan + cached, labels=labels)

    established = gauge(
        "tcpwatch_destination_established",
        "Live outbound ESTABLISHED connections towards a destination whose tcp_info was read.",
    )
    rtt = gauge(
        "tcpwatch_destination_rtt_seconds",
        "Mean smoothed RTT (tcpi_rtt) of the live connections towards a destination.",
    )
    rtt_max = gauge(
        "tcpwatch_destination_rtt_max_seconds",
        "Largest smoothed RTT among the live connections towards a destination.",
    )
    in_flight = gauge(
        "tcpwatch_destination_retransmits_in_flight",
        "Segments retransmitted and not yet acknowledged, summed over the live connections "
        "towards a destination (tcpi_retrans), now.",
    )
    retransmitted = gauge(
        "tcpwatch_destination_segments_retransmitted",
        "Segments the live connections towards a destination retransmitted over their lives "
        "(sum of tcpi_total_retrans; falls when connections close).",
    )
    sent = gauge(
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
