"""C rules: whether connections work, from the connections that closed during the window.

They read ``Snapshot.connections`` (the socket-destroy listener's cumulative per-peer counts,
docs/connections.md) at both ends of the window and judge the difference: without a window, or
when the listener restarted in between (its event count went backwards), they stay silent. A
peer absent at the window's start counts from zero; so does one whose counts went backwards (it
was evicted after being idle and came back, so everything it has now happened in the window).
The ``other`` row folds many peers together and is never judged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tcpwatch.model import OUTCOMES, PEER_OTHER, LifecycleStats, PeerStats, ProcessRef, Snapshot
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
from tcpwatch.rules.queues import listener_groups
from tcpwatch.rules.shapes import add_window, ratio_severity

FAILURES: tuple[str, ...] = ("timeout", "refused", "aborted")


@dataclass(frozen=True, slots=True)
class PeerWindow:
    """What one (direction, peer) did during the window."""

    direction: str
    peer: str
    closed: dict[str, int]  # outcome -> connections closed in the window
    rtt_count: int
    rtt_sum_seconds: float
    segments_sent: int
    segments_retransmitted: int

    @property
    def attempts(self) -> int:
        return sum(self.closed.values())

    @property
    def failures(self) -> int:
        return sum(self.closed[outcome] for outcome in FAILURES)


def _difference(now: PeerStats, before: PeerStats | None) -> PeerWindow:
    if before is not None and (
        any(now.closed.get(o, 0) < before.closed.get(o, 0) for o in OUTCOMES)
        or now.rtt_count < before.rtt_count
        or now.segments_sent < before.segments_sent
        or now.segments_retransmitted < before.segments_retransmitted
    ):
        before = None  # evicted and back: its row restarted inside the window
    if before is None:
        return PeerWindow(
            now.direction,
            now.peer,
            {o: now.closed.get(o, 0) for o in OUTCOMES},
            now.rtt_count,
            now.rtt_sum_seconds,
            now.segments_sent,
            now.segments_retransmitted,
        )
    return PeerWindow(
        now.direction,
        now.peer,
        {o: now.closed.get(o, 0) - before.closed.get(o, 0) for o in OUTCOMES},
        now.rtt_count - before.rtt_count,
        max(now.rtt_sum_seconds - before.rtt_sum_seconds, 0.0),
        now.segments_sent - before.segments_sent,
        now.segments_retransmitted - before.segments_retransmitted,
    )


def peer_windows(window: Window, direction: str) -> tuple[PeerWindow, ...]:
    """Every peer of ``direction`` (not ``other``) with what it did in the window; () without a
    window, without the source at either end, or across a restart of the listener."""
    if window.previous is None:
        return ()
    now: LifecycleStats | None = window.current.connections
    before: LifecycleStats | None = window.previous.connections
    if now is None or before is None or now.events < before.events:
        return ()
    earlier = {(p.direction, p.peer): p for p in before.peers}
    return tuple(
        _difference(peer, earlier.get((peer.direction, peer.peer)))
        for peer in now.peers
        if peer.direction == direction and peer.peer != PEER_OTHER
    )


def split_peer(peer: str) -> tuple[str, int | None]:
    """ "10.0.0.5:5432" -> ("10.0.0.5", 5432); "[::1]:443" -> ("::1", 443); a bare address (the
    kernel cleared the port) -> (address, None)."""
    if peer.startswith("["):
        address, _, port = peer[1:].partition("]:")
        return address, int(port)
    if peer.count(":") == 1:
        address, _, port = peer.partition(":")
        return address, int(port)
    return peer, None


def _add_owner(evidence: dict[str, EvidenceValue], owners: list[ProcessRef]) -> None:
    if len(owners) == 1:
        evidence["process"] = owners[0].name
        evidence["pid"] = owners[0].pid
    elif owners:
        evidence["process"] = ", ".join(process_label(owner) for owner in owners)


def syn_sent_owners(snapshot: Snapshot, peer: str) -> tuple[int, list[ProcessRef]]:
    """SYN_SENT sockets towards ``peer`` now, and their owners where that is certain: the
    snapshot's SYN_SENT inodes carry no destination, so only when every SYN_SENT socket of the
    namespace goes to this one destination."""
    sockets = snapshot.sockets
    if sockets is None:
        return 0, []
    address, port = split_peer(peer)
    count = sum(d.sockets for d in sockets.syn_sent if (d.address, d.port) == (address, port))
    inodes = sockets.inodes_by_state.get("syn_sent")
    if count == 0 or not inodes or count != sum(d.sockets for d in sockets.syn_sent):
        return count, []
    found = {owner_of(snapshot, inode) for inode in inodes}
    return count, sorted(
        (o for o in found if o is not None), key=lambda owner: (owner.name, owner.pid)
    )


# --- C01 -------------------------------------------------------------------------------------

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


def _c01_remediation(netns: str, peer: str, closed: dict[str, int]) -> str:
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
        _add_owner(evidence, owners)
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
            _c01_remediation(netns, peer.peer, peer.closed),
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
        _add_owner(evidence, [owner] if owner is not None else [])
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
