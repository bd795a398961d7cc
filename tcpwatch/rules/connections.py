"""C rules: whether connections work, from the connections that closed during the window.

They read ``Snapshot.connections`` (the socket-destroy listener's cumulative per-peer counts,
docs/connections.md) at both ends of the window and judge the difference
(:mod:`tcpwatch.rules.peers`): without a window, or when the listener restarted in between,
they stay silent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from tcpwatch.model import Destination, Snapshot
from tcpwatch.rules.base import (
    EvidenceValue,
    Finding,
    Severity,
    Threshold,
    Thresholds,
    Window,
    required,
    rule,
)
from tcpwatch.rules.fixes import owner_of, process_label, run_in
from tcpwatch.rules.peers import (
    FAILURES,
    add_owner,
    peer_windows,
    split_peer,
    syn_sent_owners,
)
from tcpwatch.rules.shapes import add_window, ratio_severity
from tcpwatch.rules.shared import full_queue, listener_groups, local_listener

# --- C01 -------------------------------------------------------------------------------------


def _full_local_listener(
    snapshot: Snapshot, address: str, port: int | None
) -> tuple[str, str] | None:
    """(listener, "accept" or "SYN") when the destination is a listener here with a full queue."""
    if port is None:
        return None
    family = "ipv6" if ":" in address else "ipv4"
    group = local_listener(snapshot, Destination(family, address, port, 0))
    full = None if group is None else full_queue(snapshot, group)
    return None if group is None or full is None else (group.name, full)


_CAUSES: dict[str, str] = {
    "timeout": "# timeout: no answer to the SYNs: a firewall or security group drops them, the "
    "route is wrong, the host is down, or the remote listener's SYN queue is full with "
    "tcp_syncookies=0 (K01/Q04 on that host) or its accept queue is full (Q01 there)",
    "refused": "# refused: answered with a reset: nothing listens on that port there, a firewall "
    "rejects with RST (nft/iptables `reject with tcp reset`), or the remote accept queue is full "
    "with tcp_abort_on_overflow=1 (K04 there)",
    "aborted": "# aborted: the kernel cleared the peer: blocking connect() calls that failed "
    "(refused or timed out), or close() with SO_LINGER 0 (an abortive close sending a reset)",
}


def _c01_remediation(netns: str, peer: str, closed: Mapping[str, int]) -> str:
    address, port = split_peer(peer)
    lines = [_CAUSES[outcome] for outcome in FAILURES if closed[outcome]]
    where = f"host {address}" if port is None else f"host {address} and tcp port {port}"
    if port is None:
        lines.append("# the port is unknown (cleared by the kernel); which sockets are trying:")
        lines.append(run_in(netns, f"ss -tnp 'dst {peer}'"))
    else:
        lines.append("# which processes are trying now, and the route they take:")
        lines.append(run_in(netns, f"ss -tnp state syn-sent 'dst {peer}'"))
        lines.append(run_in(netns, f"ip route get {address}"))
    lines.append("# SYNs out, SYN-ACKs or resets back (30 s at most):")
    lines.append(
        run_in(
            netns,
            f"timeout 30 tcpdump -ni any -c 50 '{where} and "
            "tcp[tcpflags] & (tcp-syn|tcp-rst) != 0'",
        )
    )
    if port is not None and closed["refused"]:
        lines.append(f"# on {address}: ss -ltn 'sport = :{port}' (is anything listening?)")
    lines.append("# the namespace's own count of failed connects, growing while this lasts:")
    lines.append(run_in(netns, "nstat -az TcpAttemptFails"))
    lines.append(
        "# in the clients: a connect timeout and retries with backoff keep a failing "
        "destination from piling up requests"
    )
    return "\n".join(lines)


@rule(
    "C01",
    "connect-failures",
    "warning",
    "Connections to a destination fail: timeouts, refusals or aborts among the attempts",
    thresholds=(
        Threshold(
            "minimum_attempts",
            10,
            1,
            1e9,
            "connections",
            "connections to one destination closed in the window before it is judged",
        ),
        Threshold(
            "warning", 0.1, 0.001, 1.0, "ratio", "failed / attempted connections for a warning"
        ),
        Threshold(
            "critical", 0.5, 0.001, 1.0, "ratio", "failed / attempted connections for critical"
        ),
    ),
    sysctls=("net.ipv4.tcp_syncookies", "net.ipv4.tcp_max_syn_backlog"),  # a local listener's
)
def C01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    peers = peer_windows(window, "outbound")
    minimum = required(thresholds, "minimum_attempts")
    seconds = window.seconds or 0.0
    # A bare address holds the aborted connects whose port the kernel cleared: judge them
    # against every attempt to that address.
    by_address: dict[str, int] = {}
    for peer in peers:
        address = split_peer(peer.peer)[0]
        by_address[address] = by_address.get(address, 0) + peer.attempts
    netns = window.current.netns
    for peer in peers:
        address, port = split_peer(peer.peer)
        attempts = peer.attempts if port is not None else by_address[address]
        if peer.failures == 0 or attempts < minimum:
            continue
        ratio = peer.failures / attempts
        severity: Severity | None = ratio_severity(ratio, thresholds)
        if severity is None:
            continue
        if port is None:
            # Abortive closes of working connections look the same: never page on them alone.
            severity = "warning"
        evidence: dict[str, EvidenceValue] = {"destination": peer.peer, "attempts": attempts}
        evidence.update(peer.closed)
        evidence["failure_ratio"] = round(ratio, 4)
        if seconds > 0:
            evidence["failures_per_second"] = round(peer.failures / seconds, 3)
        add_window(evidence, window)
        syn_sent, owners = syn_sent_owners(window.current, peer.peer)
        if syn_sent:
            evidence["syn_sent_sockets"] = syn_sent
        add_owner(evidence, owners)
        remediation = _c01_remediation(netns, peer.peer, peer.closed)
        local = _full_local_listener(window.current, address, port)
        if local is not None:
            # The destination is a listener here whose queue is full: the kernel drops the SYNs.
            evidence["local_listener"], evidence["full_queue"] = local
            remediation = (
                f"# {peer.peer} is a listener of this namespace whose {local[1]} queue is full: "
                f"the kernel drops SYNs to it, the network is not at fault; see the "
                f"{'Q01' if local[1] == 'accept' else 'Q04'} finding for {local[0]}\n" + remediation
            )
        what = ", ".join(f"{peer.closed[o]} {o}" for o in FAILURES if peer.closed[o])
        who = f" ({', '.join(process_label(o) for o in owners)})" if owners else ""
        title = (
            f"{peer.failures} of {attempts} connections to {peer.peer}{who} failed in "
            f"{seconds:.0f} s: {what}"
        )
        if port is None:
            title += " (port cleared by the kernel: failed blocking connects or SO_LINGER 0)"
        yield C01.finding(
            window,
            title,
            evidence,
            remediation,
            subject=peer.peer,
            severity=severity,
        )


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
            f"{ratio:.1%} of segments to {peer.peer} retransmitted "
            f"({peer.segments_retransmitted} of {peer.segments_sent})",
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
