"""Rules over what the kernel's TCP tracepoints said (``Snapshot.tracepoints``): slow handshakes
to a destination (C04) and resets sent, with the kernel's reason (C05).

The counts are cumulative since the reader started; the rules judge their difference over the
window, and stay silent without a window or when the reader restarted in between (a count went
backwards). docs/tracepoints.md explains the source.
"""

from __future__ import annotations

from collections.abc import Iterator

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
from tcpwatch.rules.fixes import run_in
from tcpwatch.rules.peers import split_peer
from tcpwatch.rules.shapes import add_window
from tcpwatch.rules.shared import listener_groups, local_destination, local_listener
from tcpwatch.rules.tracewindow import (
    failures_at,
    handshakes_in,
    processes,
    quantile,
    records_missed,
    resets_in,
)


def _local(snapshot: Snapshot, destination: str) -> str | None:
    """The listener of this namespace the destination is, if it is one."""
    address, port = split_peer(destination)
    if port is None:
        return None
    family = "ipv6" if ":" in address else "ipv4"
    group = local_listener(snapshot, Destination(family, address, port, 0))
    return group.name if group is not None else None


def missed_line(missed: int) -> str:
    """The remediation's caveat when the kernel did not deliver records during the window."""
    return (
        f"# the kernel did not deliver {missed} tracepoint records during the window (a full "
        "ring, or dropped: tcpwatch_tracepoint_records_lost_total, _undelivered_total; any "
        "namespace's): the counts here may be short by as many"
    )


# --- C04 -------------------------------------------------------------------------------------


@rule(
    "C04",
    "slow-handshake",
    "warning",
    "Connects to a destination take long to complete: SYNs retransmitted or a slow path",
    sysctls=("net.ipv4.tcp_syncookies", "net.ipv4.tcp_max_syn_backlog"),  # a local listener's
    thresholds=(
        Threshold(
            "minimum_connects",
            20,
            1,
            1e9,
            "connects",
            "completed connects to the destination in the window before their time is judged",
        ),
        Threshold(
            "warning_seconds",
            0.5,
            0.0001,
            60,
            "seconds",
            "90th percentile of the handshake time (SYN_SENT to ESTABLISHED) for a warning",
        ),
        Threshold(
            "critical_seconds",
            3.0,
            0.0001,
            60,
            "seconds",
            "90th percentile of the handshake time for critical (two SYN retransmissions: 3 s)",
        ),
    ),
)
def C04(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    found = handshakes_in(window)
    if not found:
        return
    minimum = required(thresholds, "minimum_connects")
    warning = required(thresholds, "warning_seconds")
    critical = required(thresholds, "critical_seconds")
    netns = window.current.netns
    for destination, seen in sorted(found.items()):
        if seen.count < minimum:
            continue
        p90 = quantile(seen.buckets, 0.9)
        if p90 < warning:
            continue
        address, port = split_peer(destination)
        here = local_destination(window, address, port) if port is not None else None
        if here is not None and here.listener_dropping:
            continue  # a listener of this namespace dropping SYNs: Q01, Q02 or Q04 is the finding
        severity: Severity = "critical" if p90 >= critical else "warning"
        share = seen.retransmitted / seen.count
        evidence: dict[str, EvidenceValue] = {
            "destination": destination,
            "connects": seen.count,
            "p90_seconds": round(p90, 4),
            "mean_seconds": round(seen.sum_seconds / seen.count, 4),
            "retransmitted": seen.retransmitted,
            "retransmitted_share": round(share, 4),
            "syn_retransmits": seen.syn_retransmits,
            "processes": processes(seen.processes),
        }
        if seen.failed:
            evidence["failed"] = seen.failed
        listener = _local(window.current, destination)
        if listener is not None:
            evidence["local_listener"] = listener
        missed = records_missed(window)
        if missed:
            evidence["tracepoint_records_missed"] = missed
        add_window(evidence, window)
        lines = [missed_line(missed)] if missed else []
        if seen.retransmitted:
            lines.append(
                f"# {seen.retransmitted} of {seen.count} connects needed a SYN retransmission "
                "(1 s, then 2, 4 ... each): a SYN or its SYN-ACK was lost. Usual causes: the "
                "destination's listener drops SYNs (a full accept queue, or a full SYN queue "
                "with tcp_syncookies=0: Q01/Q02/Q04 there), a firewall or conntrack table "
                "dropping them (dmesg: 'nf_conntrack: table full'), loss on the path"
            )
        else:
            lines.append(
                "# no SYN was retransmitted: each handshake is slow by itself, a long path (the "
                "RTT) or a destination that answers SYNs late (an overloaded host)"
            )
        if listener is not None:
            lines.append(
                f"# {destination} is a listener of this namespace ({listener}): its queues and "
                "drops are in this host's findings (Q01, Q02, Q04)"
            )
            lines.append(run_in(netns, f"ss -ltnm 'sport = :{port}'"))
        lines += [
            "# the handshakes as they happen (SYN, SYN-ACK and their repeats), 30 s at most:",
            run_in(
                netns,
                f"timeout 30 tcpdump -ni any -c 40 'host {address} and tcp port {port} "
                "and tcp[tcpflags] & tcp-syn != 0'",
            ),
            "# the path's RTT and loss to that port:",
            run_in(netns, f"mtr -rwzbc 50 --tcp -P {port} {address}"),
            "# the namespace's SYN retransmissions, growing while this lasts:",
            run_in(netns, "nstat -az TcpExtTCPSynRetrans"),
        ]
        yield C04.finding(
            window,
            f"connects to {destination} take {p90:.3g} s at the 90th percentile "
            f"({seen.retransmitted} of {seen.count} needed a SYN retransmission)",
            evidence,
            "\n".join(lines),
            subject=destination,
            severity=severity,
        )


# --- C05 -------------------------------------------------------------------------------------

# The reasons judged: resets that say something is wrong. An application's own abortive close
# (TCP_ABORT_ON_CLOSE, TCP_STATE: haproxy and nginx close connections that way on purpose) and
# protocol noise (stray or out-of-window segments) are in the metrics, not findings.
JUDGED = ("NO_SOCKET", "TCP_KEEPALIVE_TIMEOUT", "TCP_ABORT_ON_MEMORY")
# What each reason (include/net/rstreason.h) means, for the finding's first remediation line.
_REASONS: dict[str, str] = {
    "NO_SOCKET": "clients reach {peer} where nothing listens: a service down, moved to another "
    "port or address, a client configured with a stale address, or a port scan",
    "TCP_ABORT_ON_CLOSE": "the application closed connections with data it had not read: the "
    "peer gets a reset instead of a FIN (a server closing without reading a pipelined request, "
    "a client abandoning a response)",
    "TCP_ABORT_ON_DATA": "data arrived after the application closed its side: the peer keeps "
    "sending to a socket nobody reads",
    "TCP_ABORT_ON_LINGER": "sockets closed in FIN_WAIT2 that the kernel abandoned (TCP_LINGER2 "
    "below 0)",
    "TCP_ABORT_ON_MEMORY": "TCP memory or the orphan limit ran out: see K07 and K11",
    "TCP_KEEPALIVE_TIMEOUT": "keepalive probes went unanswered: the peer or a middlebox on the "
    "path forgot the connection",
    "TCP_STATE": "connections reset by their state: an abortive close (SO_LINGER 0), or a "
    "listener closed with connections still in its queue",
    "TCP_DISCONNECT_WITH_DATA": "connections disconnected with data still queued",
    "TCP_TIMEWAIT_SOCKET": "segments reached a connection in TIME_WAIT that did not fit it",
}


def _refused_clients(window: Window, peer: str) -> str:
    """Processes of this namespace whose connects to ``peer`` were refused in the window."""
    found = handshakes_in(window) or {}
    seen = found.get(peer)
    return processes(seen.processes) if seen is not None and seen.failed else ""


@rule(
    "C05",
    "tcp-resets",
    "warning",
    "Resets sent to a peer for a reason that says something is wrong: a port nothing listens on",
    thresholds=(
        Threshold(
            "minimum_resets",
            10,
            1,
            1e12,
            "resets",
            "resets sent for one reason to one peer in the window to report them",
        ),
    ),
)
def C05(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    resets = resets_in(window)
    if not resets:
        return
    minimum = required(thresholds, "minimum_resets")
    snapshot = window.current
    netns = snapshot.netns
    listening = {group.port for group in listener_groups(snapshot)}
    for (direction, peer, reason), count in sorted(resets.items()):
        if direction != "sent" or count < minimum or reason not in JUDGED:
            continue
        evidence: dict[str, EvidenceValue] = {
            "peer": peer,
            "reason": reason or "unknown",
            "resets_sent": count,
        }
        seconds = window.seconds
        if seconds:
            evidence["per_second"] = round(count / seconds, 3)
        received = resets.get(("received", peer, ""), 0)
        if received > 0:
            evidence["resets_received"] = received
        address, port = split_peer(peer)
        if reason == "NO_SOCKET":
            refused_here = sum(
                f.errors.get("ECONNREFUSED", 0)
                for f in failures_at(window, address)
                if f.destination == peer
            )
            if refused_here >= count:
                continue  # every reset answered a client of this namespace: C01's finding
        clients = _refused_clients(window, peer) if reason == "NO_SOCKET" else ""
        if clients:
            evidence["clients"] = clients
        if reason == "NO_SOCKET" and port in listening:
            evidence["listening_now"] = "yes"
        missed = records_missed(window)
        if missed:
            evidence["tracepoint_records_missed"] = missed
        add_window(evidence, window)
        meaning = _REASONS.get(reason, f"the kernel's reason {reason or 'unknown'}")
        lines = [f"# {meaning.format(peer=peer)}"]
        if missed:
            lines.append(missed_line(missed))
        if reason == "NO_SOCKET":
            lines.append(
                f"# is anything listening on port {port} (on any address)? Something does now: "
                "it came back, or listens on another address"
                if port in listening
                else f"# is anything listening on port {port}?"
            )
            lines.append(run_in(netns, f"ss -ltnp 'sport = :{port}'"))
            if clients:
                lines.append(f"# local clients still connecting to it: {clients}")
            lines.append("# who sends the SYNs (their source addresses), 30 s at most:")
            lines.append(
                run_in(
                    netns,
                    f"timeout 30 tcpdump -ni any -c 20 'dst host {address} and dst port {port} "
                    "and tcp[tcpflags] & tcp-syn != 0'",
                )
            )
        else:
            lines.append("# the connections to and from that peer, with their state and queues:")
            lines.append(run_in(netns, f"ss -tnpo '( dst {peer} or src {peer} )'"))
        lines.append("# the namespace's resets, growing while this lasts:")
        lines.append(
            run_in(netns, "nstat -az TcpOutRsts TcpExtTCPAbortOnClose TcpExtTCPAbortOnData")
        )
        yield C05.finding(
            window,
            f"{count} resets sent for {reason or 'an unknown reason'} to clients of {peer}"
            if reason == "NO_SOCKET"
            else f"{count} resets sent to {peer} ({reason or 'reason unknown'})",
            evidence,
            "\n".join(lines),
            subject=f"{peer} {reason}".strip(),
        )
