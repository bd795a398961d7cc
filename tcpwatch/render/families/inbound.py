"""Families of the live connections per (direction, peer): where their time went and what waits
in their queues (docs/connections.md, "Who is slow"). Inbound peers come from the ``inbound``
source (the listeners' scan), outbound ones from the per-destination scan of ``sockdiag``;
one family holds both so a peer is one series whichever scan saw it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from tcpwatch.render.families.base import NETNS, family, gauge
from tcpwatch.stalls import LivePeer, Stalls, live_peers, slowness
from tcpwatch.state import ExportState

PEER_LABELS = ["netns", "direction", "peer"]
# (name, help, value of a peer's stalls or None to leave the series out)
LIVE_FAMILIES: tuple[tuple[str, str, Callable[[Stalls], float | None]], ...] = (
    (
        "tcpwatch_live_connections",
        "Live ESTABLISHED connections of a peer read by the latest scan: a listener's clients "
        "(inbound, the listeners' scan) or a destination's (outbound, the per-destination scan).",
        lambda s: s.connections,
    ),
    (
        "tcpwatch_live_busy_seconds",
        "Time the peer's live connections had data to send (tcpi_busy_time, Linux 4.10+), "
        "summed over their lives so far; it includes the two limited times. A gauge: it falls "
        "when connections close.",
        lambda s: s.busy_seconds,
    ),
    (
        "tcpwatch_live_rwnd_limited_seconds",
        "Of the busy time, time spent waiting on the receiver's window (tcpi_rwnd_limited): the "
        "peer does not read fast enough or advertises a small window. Divide by "
        "tcpwatch_live_busy_seconds for the share.",
        lambda s: s.rwnd_limited_seconds,
    ),
    (
        "tcpwatch_live_sndbuf_limited_seconds",
        "Of the busy time, time spent waiting on this host's send buffer (tcpi_sndbuf_limited): "
        "SO_SNDBUF or net.ipv4.tcp_wmem too small for the path's bandwidth times RTT.",
        lambda s: s.sndbuf_limited_seconds,
    ),
    (
        "tcpwatch_live_send_queue_bytes",
        "Bytes written and not yet acknowledged by the peer (Send-Q), summed over its live "
        "connections, now.",
        lambda s: s.send_queue_bytes,
    ),
    (
        "tcpwatch_live_receive_queue_bytes",
        "Bytes received and not yet read by the local application (Recv-Q), summed over the "
        "peer's live connections, now.",
        lambda s: s.receive_queue_bytes,
    ),
    (
        "tcpwatch_live_zero_window_connections",
        "Live connections whose peer's receive window is closed now (the zero-window probe "
        "timer is armed: this host has data and may not send it).",
        lambda s: s.zero_window,
    ),
    (
        "tcpwatch_live_receive_full_connections",
        "Live connections holding unread data with half or more of their receive buffer in "
        "use now: the local application is not reading.",
        lambda s: s.receive_full,
    ),
    (
        "tcpwatch_live_socket_drops",
        "Packets the kernel dropped at the peer's live sockets (sk_drops, ss -m d<N>: a full "
        "receive buffer or backlog), summed over their lives. A gauge: it falls when "
        "connections close.",
        lambda s: s.drops,
    ),
    (
        "tcpwatch_live_rto_seconds",
        "Time the peer's live connections spent recovering from retransmission timeouts "
        "(tcpi_total_rto_time, Linux 6.7+), summed over their lives.",
        lambda s: s.rto_seconds,
    ),
)


def top_live_peers(state: ExportState) -> list[tuple[str, LivePeer]]:
    """(netns, peer) of the ``state.live_peers`` slowest live peers of the whole host (the
    series' bound: docs/metrics.md, "Series arithmetic"): those waiting on something first, then
    by time spent waiting (stalls.slowest), whatever namespace they are in."""
    found = [
        (snap.netns, peer)
        for snap in state.snapshots
        for peer in live_peers(snap.sockets, snap.inbound)
    ]
    found.sort(key=lambda item: (slowness(item[1]), item[0]))
    return found[: state.live_peers]


@family(source="inbound", order=55)
def live_peer_families(state: ExportState) -> Iterator[Metric]:
    families: list[tuple[GaugeMetricFamily, Callable[[Stalls], float | None]]] = [
        (gauge(name, doc, PEER_LABELS, state), value) for name, doc, value in LIVE_FAMILIES
    ]
    for netns, peer in top_live_peers(state):
        labels = [netns, peer.direction, peer.peer]
        for metric, value_of in families:
            value = value_of(peer.stalls)
            if value is not None:
                metric.add_metric(labels, value)
    yield from (metric for metric, _ in families)


@family(source="inbound", order=56)
def inbound_scan_families(state: ExportState) -> Iterator[Metric]:
    scanned = gauge(
        "tcpwatch_inbound_connections_scanned",
        "Inbound ESTABLISHED connections the latest listeners' scan read (at most "
        "collect.inbound_connections).",
        NETNS,
        state,
    )
    complete = gauge(
        "tcpwatch_inbound_scan_complete",
        "1 when the latest listeners' scan read every inbound connection, 0 when "
        "collect.inbound_connections cut it short: the inbound tcpwatch_live_* figures are then "
        "a sample.",
        NETNS,
        state,
    )
    scanned_at = gauge(
        "tcpwatch_inbound_scan_timestamp_seconds",
        "Unix time of the listeners' scan the inbound tcpwatch_live_* figures come from; serve "
        "repeats it every collect.destinations_interval seconds.",
        NETNS,
        state,
    )
    for snap in state.snapshots:
        if snap.inbound is None:
            continue
        scanned.add_metric([snap.netns], snap.inbound.connections)
        complete.add_metric([snap.netns], 1 if snap.inbound.complete else 0)
        scanned_at.add_metric([snap.netns], snap.inbound.scanned_at)
    yield from (scanned, complete, scanned_at)
