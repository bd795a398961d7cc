"""C02 and C03: how connections that worked fared, from the connections that closed during the
window (C01, connects that fail, is in connects.py).

They read ``Snapshot.connections`` (the socket-destroy listener's cumulative per-peer counts,
docs/connections.md) at both ends of the window and judge the difference
(:mod:`tcpwatch.rules.peers`): without a window, or when the listener restarted in between,
they stay silent.
"""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.rules.base import (
    EvidenceValue,
    Finding,
    Threshold,
    Thresholds,
    Window,
    required,
    rule,
)
from tcpwatch.rules.fixes import owner_of, process_label, run_in
from tcpwatch.rules.peers import (
    add_owner,
    peer_windows,
    split_peer,
)
from tcpwatch.rules.shapes import add_window, ratio_severity
from tcpwatch.rules.shared import is_local, listener_groups, local_destination

# --- C02 -------------------------------------------------------------------------------------


def _retransmission_thresholds(prefix: str, warning: float) -> tuple[Threshold, Threshold]:
    return (
        Threshold(
            f"{prefix}minimum_segments",
            500,
            1,
            1e12,
            "segments",
            "segments sent to the peer in the window before its ratio is judged",
        ),
        Threshold(
            f"{prefix}warning" if prefix else "warning",
            warning,
            0.001,
            1.0,
            "ratio",
            "segments retransmitted / segments sent for a warning",
        ),
    )


@rule(
    "C02",
    "retransmissions",
    "warning",
    "Connections to a destination retransmit much of what they send: loss on the path",
    thresholds=(
        *_retransmission_thresholds("", 0.02),
        Threshold(
            "critical",
            0.1,
            0.001,
            1.0,
            "ratio",
            "segments retransmitted / segments sent for critical",
        ),
    ),
)
def C02(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    minimum = required(thresholds, "minimum_segments")
    netns = window.current.netns
    for peer in peer_windows(window, "outbound"):
        address, port = split_peer(peer.peer)
        # Failed connects send only SYNs and their retries: that is C01's case, not loss.
        if port is None or peer.closed["ok"] == 0 or peer.segments_sent < minimum:
            continue
        ratio = peer.segments_retransmitted / peer.segments_sent
        severity = ratio_severity(ratio, thresholds)
        if severity is None:
            continue
        evidence: dict[str, EvidenceValue] = {
            "destination": peer.peer,
            "segments_sent": peer.segments_sent,
            "segments_retransmitted": peer.segments_retransmitted,
            "retransmission_ratio": round(ratio, 4),
            "connections_closed": peer.attempts,
        }
        if peer.closed["timeout"]:
            evidence["timeout"] = peer.closed["timeout"]  # their SYN retries are counted too
        add_window(evidence, window)
        title = (
            f"{ratio:.1%} of segments to {peer.peer} retransmitted "
            f"({peer.segments_retransmitted} of {peer.segments_sent})"
        )
        if is_local(window.current, address):
            # No path to lose anything on: the receiver dropped (a full backlog or receive
            # buffer) or was too slow to acknowledge before a timer fired (a busy CPU).
            evidence["destination_local"] = "yes"
            lines = [
                f"# {peer.peer} is on this host: no network path is involved. Retransmissions "
                "here come from the receiving application (drops at its full socket backlog or "
                "receive buffer) or from a CPU too busy to acknowledge before the sender's timer "
                "fired (spurious retransmissions, tail-loss probes)",
                run_in(
                    netns,
                    "nstat -az TcpExtTCPBacklogDrop TcpExtTCPRcvQDrop "
                    "TcpExtTCPSpuriousRTOs TcpExtTCPLossProbes",
                ),
                "# per connection: retrans and rto of the live ones:",
                run_in(netns, f"ss -tni 'dst {peer.peer}'"),
            ]
            local = local_destination(window, address, port)
            if local is not None and local.listener_dropping and local.group is not None:
                lines.insert(
                    1,
                    f"# its listener {local.group.name} dropped SYNs during the window (see Q02): "
                    "the clients' SYN retries are counted among these retransmissions",
                )
            yield C02.finding(
                window,
                title + ": on this host, not the network",
                evidence,
                "\n".join(lines),
                subject=peer.peer,
                severity="info",
            )
            continue
        lines = [
            f"# {ratio:.1%} of the segments sent to {peer.peer} were sent again: loss on the "
            "path (a congested or faulty link, a policer), a path MTU blackhole (large "
            "segments lost while small ones pass, ICMP 'fragmentation needed' filtered), or a "
            "congested receiver",
            "# per connection: retrans, rto, mss and pmtu of the live ones:",
            run_in(netns, f"ss -tni 'dst {peer.peer}'"),
            "# where on the path the loss is (TCP probes to the same port):",
            run_in(netns, f"mtr -rwzbc 100 --tcp -P {port} {address}"),
            "# path MTU: does a full-size packet pass with DF set (1472 = 1500 - 28 for IPv4)?",
            run_in(netns, f"ping -M do -s 1472 -c 3 {address}"),
            "# the namespace's retransmissions, growing while this lasts:",
            run_in(netns, "nstat -az TcpRetransSegs TcpOutSegs TcpExtTCPLostRetransmit"),
        ]
        if peer.closed["timeout"]:
            lines.insert(0, "# timed-out connects count their SYN retries here: see C01 too")
        yield C02.finding(
            window,
            title,
            evidence,
            "\n".join(lines),
            subject=peer.peer,
            severity=severity,
        )


# --- C03 -------------------------------------------------------------------------------------


@rule(
    "C03",
    "listener-client-quality",
    "warning",
    "A listener's clients see a high round-trip time or retransmit much: a slow or lossy path",
    thresholds=(
        Threshold(
            "rtt_seconds",
            0.25,
            0.0001,
            60,
            "seconds",
            "mean smoothed RTT of the listener's connections closed in the window to warn",
        ),
        Threshold(
            "minimum_connections",
            20,
            1,
            1e9,
            "connections",
            "connections with an RTT sample closed in the window before the RTT is judged",
        ),
        *_retransmission_thresholds("retransmission_", 0.05),
    ),
)
def C03(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    rtt_limit = required(thresholds, "rtt_seconds")
    minimum_rtt = required(thresholds, "minimum_connections")
    minimum_segments = required(thresholds, "retransmission_minimum_segments")
    ratio_limit = required(thresholds, "retransmission_warning")
    snapshot = window.current
    groups = {group.name: group for group in listener_groups(snapshot)}
    netns = snapshot.netns
    for peer in peer_windows(window, "inbound"):
        mean = peer.rtt_sum_seconds / peer.rtt_count if peer.rtt_count else 0.0
        slow = peer.rtt_count >= minimum_rtt and mean >= rtt_limit
        sent = peer.segments_sent
        ratio = peer.segments_retransmitted / sent if sent else 0.0
        lossy = sent >= minimum_segments and ratio >= ratio_limit
        if not (slow or lossy):
            continue
        evidence: dict[str, EvidenceValue] = {
            "listener": peer.peer,
            "connections_closed": peer.attempts,
            "rtt_samples": peer.rtt_count,
        }
        if peer.rtt_count:
            evidence["rtt_mean_seconds"] = round(mean, 6)
        evidence["segments_sent"] = sent
        evidence["segments_retransmitted"] = peer.segments_retransmitted
        if sent:
            evidence["retransmission_ratio"] = round(ratio, 4)
        add_window(evidence, window)
        group = groups.get(peer.peer)
        owner = owner_of(snapshot, group.sockets[0].inode) if group is not None else None
        add_owner(evidence, [owner] if owner is not None else [])
        problems = []
        if slow:
            problems.append(f"mean RTT {mean * 1000:.0f} ms")
        if lossy:
            problems.append(f"{ratio:.1%} of segments retransmitted")
        _, port = split_peer(peer.peer)
        lines = [
            "# the clients of this listener are far away or behind a slow or lossy path "
            "(mobile networks, an overloaded link, a VPN); the server itself may be fine",
            "# which clients (RTT and retransmissions per live connection):",
            run_in(netns, f"ss -tni state established 'sport = :{port}' | head -40"),
            "# a high RTT on a LAN: the receiver delays (overloaded host, bufferbloat in a "
            "queue on the way); loss: check the links and NIC counters (`ip -s link`)",
            "# verify: the RTT histogram and ratio of this peer in /metrics "
            "(tcpwatch_connection_rtt_seconds, tcpwatch_connection_segments_retransmitted_total)",
        ]
        label = process_label(owner) if owner is not None else "owner unknown"
        yield C03.finding(
            window,
            f"clients of {peer.peer} ({label}): {' and '.join(problems)}",
            evidence,
            "\n".join(lines),
            subject=peer.peer,
        )
