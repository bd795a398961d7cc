"""Families of the ``tracepoints`` source: what the kernel's TCP tracepoints said since the
host-wide reader started. Per namespace: connect times per (destination, process), connect
failures with their errno, SYN retransmissions, resets sent (with the kernel's reason) and
received, packets dropped per reason and listener. Once for the host: records read, lost, and
those no namespace could be given. docs/tracepoints.md explains them."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from tcpwatch.render.families.base import counter, family
from tcpwatch.state import ExportState
from tcpwatch.tracepoint_stats import CONNECT_BUCKETS_SECONDS, TracepointHost

CONNECT_LABELS = ["netns", "destination", "process"]


@family(source="tracepoints", order=55)
def tracepoint_families(state: ExportState) -> Iterator[Metric]:
    duration = HistogramMetricFamily(
        "tcpwatch_connect_duration_seconds",
        "Handshake time of connects that completed (SYN_SENT to ESTABLISHED, from the kernel's "
        'tracepoints), per destination and connecting process ("other": past the host-wide '
        "budget, collect.connection_peers, or a destination's fifth process). Buckets as the "
        "RTT's (10 us .. 1 s), then 3, 10, 30 s: a SYN retransmission is 1 s more.",
        labels=CONNECT_LABELS,
    )
    failures = counter(
        "tcpwatch_connect_failures",
        "Connects that failed, per destination (with the port, even where the client then "
        "closed abortively), connecting process and error: the errno the kernel reported "
        "(ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH ...) or abandoned (the client closed first).",
        [*CONNECT_LABELS, "error"],
    )
    syn_retransmits = counter(
        "tcpwatch_connect_syn_retransmits",
        "SYNs retransmitted by these connects, completed or failed: each is about 1 s (then 2, "
        "4 ...) added to a handshake.",
        CONNECT_LABELS,
    )
    resets_sent = counter(
        "tcpwatch_peer_resets_sent",
        "TCP resets sent, per peer (the local port a client reached, or the destination of an "
        "outbound connection) and the kernel's reason (NO_SOCKET: nothing listens there; "
        "TCP_ABORT_ON_CLOSE: closed with unread data ...; empty before Linux 6.10). The "
        "namespace's total, attributed or not: tcpwatch_tcp_resets_sent_total.",
        ["netns", "peer", "reason"],
    )
    resets_received = counter(
        "tcpwatch_peer_resets_received",
        "TCP resets received, per peer (as tcpwatch_peer_resets_sent_total).",
        ["netns", "peer"],
    )
    folded = counter(
        "tcpwatch_tracepoint_folded",
        'Connects, resets or drops (table) counted under "other" because their peer found no '
        "room under the host-wide budget (collect.connection_peers, shared with the connection "
        "metrics, busiest first), or, for connects, the destination's named processes were 4.",
        ["netns", "table"],
    )
    drops = counter(
        "tcpwatch_packet_drops",
        "Packets the kernel dropped, per drop reason (TCP_LISTEN_OVERFLOW, NETFILTER_DROP, "
        "TCP_ZEROWINDOW ...) and the listening socket it happened at (empty: none, or not known).",
        ["netns", "reason", "listener"],
    )
    bounds = [repr(bound) for bound in CONNECT_BUCKETS_SECONDS] + ["+Inf"]
    host: TracepointHost | None = None
    for snap in state.snapshots:
        stats = snap.tracepoints
        if stats is None:
            continue
        host = host or stats.host
        for row in stats.connects:
            labels = [snap.netns, row.destination, row.process]
            if row.count:
                buckets = list(zip(bounds, row.cumulative(), strict=True))
                duration.add_metric(labels, buckets, row.sum_seconds)
            for error, count in row.failures.items():
                failures.add_metric([*labels, error], count)
            syn_retransmits.add_metric(labels, row.syn_retransmits)
        for reset in stats.resets:
            if reset.direction == "sent":
                resets_sent.add_metric([snap.netns, reset.peer, reset.reason], reset.count)
            else:
                resets_received.add_metric([snap.netns, reset.peer], reset.count)
        for drop in stats.drops:
            drops.add_metric([snap.netns, drop.reason, drop.listener], drop.count)
        for table, count in stats.folded.items():
            folded.add_metric([snap.netns, table], count)
    yield from (duration, failures, syn_retransmits, resets_sent, resets_received, drops, folded)
    yield from _host_families(host)


def _host_families(host: TracepointHost | None) -> Iterator[Metric]:
    """The reader's own counts: one host, one set of series (no netns label)."""
    records = counter(
        "tcpwatch_tracepoint_records",
        "Tracepoint records read since the reader started, per event: every namespace's and "
        "the host's (tracepoints are global), whether polled or not.",
        ["event"],
    )
    lost = counter(
        "tcpwatch_tracepoint_records_lost",
        "Records the kernel could not write because a ring buffer was full (exact: each event's "
        "own count, PERF_FORMAT_LOST, Linux 6.0+; before, the PERF_RECORD_LOST records): raise "
        "collect.tracepoint_buffer. Missing from every per-namespace count.",
        [],
    )
    undelivered = counter(
        "tcpwatch_tracepoint_records_undelivered",
        "Records the kernel counted for an event (they passed its filter) but neither wrote to "
        "its ring buffer nor counted lost (Linux 6.0+; 6.18 drops some this way), per event: "
        "missing from every per-namespace count, and not fixed by a larger buffer.",
        ["event"],
    )
    unattributed = counter(
        "tcpwatch_tracepoint_records_unattributed",
        "Records no namespace could be given, per event and reason (interrupt: written in "
        "softirq for a socket not followed; task_exited: the task was gone before it could be "
        "looked up; connect_unseen: a connect begun before the reader ...): counted, never "
        "guessed.",
        ["event", "reason"],
    )
    other = counter(
        "tcpwatch_tracepoint_records_other_netns",
        "Records attributed to network namespaces this tcpwatch does not poll (namespaces:).",
        [],
    )
    buffer = GaugeMetricFamily(
        "tcpwatch_tracepoint_buffer_bytes",
        "Ring buffer of the tracepoint reader, per CPU (collect.tracepoint_buffer, rounded down "
        "to a power of two pages).",
        labels=[],
    )
    followed = GaugeMetricFamily(
        "tcpwatch_tracepoint_sockets_followed",
        "Sockets whose later records are attributed by their kernel address (connects in "
        "progress, connected clients, listeners), at the latest poll.",
        labels=[],
    )
    if host is not None:
        for event, count in host.records.items():
            records.add_metric([event], count)
        lost.add_metric([], host.lost)
        for event, count in host.undelivered.items():
            undelivered.add_metric([event], count)
        for (event, why), count in host.unattributed.items():
            unattributed.add_metric([event, why], count)
        other.add_metric([], host.other_netns)
        buffer.add_metric([], host.buffer_bytes)
        followed.add_metric([], host.sockets_followed)
    yield from (records, lost, undelivered, unattributed, other, buffer, followed)
