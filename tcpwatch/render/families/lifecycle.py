"""Families of the ``lifecycle`` source: the connections that closed since tcpwatch subscribed
to a namespace's socket-destroy events, per (direction, peer). docs/connections.md explains
them; the host's own TCP counters beside them are the ``counters`` source's."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily, Metric

from tcpwatch.model import OUTCOMES, RTT_BUCKETS_SECONDS
from tcpwatch.render.families.base import NETNS, counter, family
from tcpwatch.state import ExportState

PEER_LABELS = ["netns", "direction", "peer"]
# A server's socket exists once the handshake completed (or, with TCP Fast Open, once the SYN
# came in), so a listener's closes are ok or aborted: these two outcomes of an inbound row are
# exported only once one happened (a Fast Open child that never completed: refused), which
# saves two always-zero series a listener row (docs/metrics.md, "Series arithmetic").
INBOUND_RARE = frozenset({"timeout", "refused"})


@family(source="lifecycle", order=50)
def closed_connection_families(state: ExportState) -> Iterator[Metric]:
    closed = counter(
        "tcpwatch_connections_closed",
        "TCP connections that closed, by direction (inbound: peer is the listener; outbound: "
        'peer is the destination), peer ("other": past the host-wide budget, '
        "collect.connection_peers) and outcome (ok, timeout, refused, aborted; "
        "docs/connections.md).",
        [*PEER_LABELS, "outcome"],
    )
    rtt = HistogramMetricFamily(
        "tcpwatch_connection_rtt_seconds",
        "Smoothed RTT (tcpi_rtt) of closed connections at close, those with an RTT sample.",
        labels=PEER_LABELS,
    )
    sent = counter(
        "tcpwatch_connection_segments_sent",
        "Segments closed connections sent (tcpi_segs_out; SYNs and retransmissions included).",
        PEER_LABELS,
    )
    retransmitted = counter(
        "tcpwatch_connection_segments_retransmitted",
        "Segments closed connections retransmitted (tcpi_total_retrans; SYN retransmissions "
        "included). Divide by tcpwatch_connection_segments_sent_total for the ratio.",
        PEER_LABELS,
    )
    bytes_sent = counter(
        "tcpwatch_connection_bytes_sent",
        "Bytes closed connections sent that the peer acknowledged (tcpi_bytes_acked; SYN and "
        "FIN count one each).",
        PEER_LABELS,
    )
    bytes_received = counter(
        "tcpwatch_connection_bytes_received",
        "Bytes closed connections received (tcpi_bytes_received; a FIN counts one).",
        PEER_LABELS,
    )
    busy = counter(
        "tcpwatch_connection_busy_seconds",
        "Time closed connections spent sending (tcpi_busy_time, Linux 4.10+: data in flight or "
        "waiting to be sent), both limited times below included.",
        PEER_LABELS,
    )
    rwnd_limited = counter(
        "tcpwatch_connection_rwnd_limited_seconds",
        "Of the busy time, how long closed connections waited on the peer's receive window "
        "(tcpi_rwnd_limited): the receiver did not read fast enough (W01).",
        PEER_LABELS,
    )
    sndbuf_limited = counter(
        "tcpwatch_connection_sndbuf_limited_seconds",
        "Of the busy time, how long closed connections waited on their own send buffer "
        "(tcpi_sndbuf_limited): tcp_wmem or SO_SNDBUF too small for the path (W03).",
        PEER_LABELS,
    )
    zero_window = counter(
        "tcpwatch_connection_zero_window_closes",
        "Connections that waited on the peer's receive window and closed while it was zero "
        "(tcpi_rwnd_limited > 0, tcpi_snd_wnd 0, Linux 5.4+): the peer had stopped reading.",
        PEER_LABELS,
    )
    events = counter(
        "tcpwatch_lifecycle_events",
        "TCP socket-destroy events received since tcpwatch subscribed in this namespace, sockets "
        "that never had a peer included.",
        NETNS,
    )
    lost = counter(
        "tcpwatch_lifecycle_events_lost",
        "Destroy events the kernel dropped because tcpwatch's receive buffer was full (the "
        "socket's sk_drops; absent before Linux 4.12). Missing from every per-peer counter.",
        NETNS,
    )
    folded = counter(
        "tcpwatch_connections_folded",
        'Closed connections not counted under their own peer: under peer="other", or under no '
        "row when the host-wide budget (collect.connection_peers) had no room left.",
        ["netns", "direction"],
    )
    unjoined = counter(
        "tcpwatch_connections_unjoined",
        "Failed connects whose port the kernel cleared (closed abortively) that no tracepoint "
        "record gave their port and errno back while the tracepoints source was up: counted "
        'under the bare address, outcome "aborted" (docs/connections.md).',
        NETNS,
    )
    overruns = counter(
        "tcpwatch_lifecycle_overruns",
        "Reads of the destroy events that failed with ENOBUFS: each means the kernel dropped one "
        "or more events since the previous read (episodes; tcpwatch_lifecycle_events_lost_total "
        "counts the events).",
        NETNS,
    )
    ignored = counter(
        "tcpwatch_lifecycle_events_ignored",
        "Destroy events of sockets that never had a peer (closed listeners, sockets never "
        "connected): counted in tcpwatch_lifecycle_events_total, in no per-peer counter.",
        NETNS,
    )
    malformed = counter(
        "tcpwatch_lifecycle_datagrams_malformed",
        "Netlink datagrams of destroy events that did not parse (the rest of each is skipped); "
        "should stay 0: more means messages laid out as tcpwatch does not expect.",
        NETNS,
    )
    evicted = counter(
        "tcpwatch_lifecycle_peers_evicted",
        "Tracked peers this namespace gave up: to a busier peer (their later closes go to peer "
        '"other") or after collect.connection_peer_idle without an event (their series end).',
        NETNS,
    )
    bounds = [repr(bound) for bound in RTT_BUCKETS_SECONDS] + ["+Inf"]
    for snap in state.snapshots:
        stats = snap.connections
        if stats is None:
            continue
        events.add_metric([snap.netns], stats.events)
        for direction, count in sorted(stats.folded.items()):
            folded.add_metric([snap.netns, direction], count)
        unjoined.add_metric([snap.netns], stats.unjoined)
        if stats.lost is not None:
            lost.add_metric([snap.netns], stats.lost)
        overruns.add_metric([snap.netns], stats.overruns)
        ignored.add_metric([snap.netns], stats.ignored)
        malformed.add_metric([snap.netns], stats.malformed)
        evicted.add_metric([snap.netns], stats.evicted)
        for row in stats.peers:
            labels = [snap.netns, row.direction, row.peer]
            for outcome in OUTCOMES:
                count = row.closed.get(outcome, 0)
                if count or row.direction != "inbound" or outcome not in INBOUND_RARE:
                    closed.add_metric([*labels, outcome], count)
            cumulative = row.rtt_cumulative()
            rtt.add_metric(labels, list(zip(bounds, cumulative, strict=True)), row.rtt_sum_seconds)
            sent.add_metric(labels, row.segments_sent)
            retransmitted.add_metric(labels, row.segments_retransmitted)
            bytes_sent.add_metric(labels, row.bytes_sent)
            bytes_received.add_metric(labels, row.bytes_received)
            waits = row.waits
            busy.add_metric(labels, waits.busy_us / 1e6)
            rwnd_limited.add_metric(labels, waits.rwnd_limited_us / 1e6)
            sndbuf_limited.add_metric(labels, waits.sndbuf_limited_us / 1e6)
            zero_window.add_metric(labels, waits.zero_window_closes)
    yield from (closed, rtt, sent, retransmitted, bytes_sent, bytes_received)
    yield from (busy, rwnd_limited, sndbuf_limited, zero_window, events, lost)
    yield from (folded, unjoined)
    yield from (overruns, ignored, malformed, evicted)
