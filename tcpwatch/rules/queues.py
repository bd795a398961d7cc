"""Q rules: listeners' accept and SYN queues, and the kernel counters of their overflows.

Listeners are judged per address:port. Sockets sharing one with SO_REUSEPORT each have their
own queues: the accept queue is judged on the fullest socket of the group; the SYN queue on the
group's sum, because request sockets cannot be told apart per socket (see model.Listener).
"""

from __future__ import annotations

from collections.abc import Iterator

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
from tcpwatch.rules.fixes import (
    backlog_hint,
    busy_owner_hint,
    comment,
    owner_evidence,
    owner_of,
    process_label,
    process_phrase,
    run_in,
    suggested_backlog,
    sysctl_fix,
)
from tcpwatch.rules.shapes import ratio_severity, ratio_thresholds
from tcpwatch.rules.shared import (
    dropping_listeners,
    drops_in_window,
    fill_ratio,
    listener_groups,
    no_cookie_syn_limit,
)

# --- Q01 -------------------------------------------------------------------------------------


@rule(
    "Q01",
    "accept-queue-full",
    "critical",
    "A listener's accept queue is (nearly) full: the application is not accepting fast enough",
    thresholds=ratio_thresholds("accept queue length / backlog", warning=0.8, critical=1.0),
    sysctls=("net.core.somaxconn",),
    counters=("TcpExtListenOverflows",),
)
def Q01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    warning = required(thresholds, "warning")
    snapshot = window.current
    somaxconn = snapshot.sysctls.get("net.core.somaxconn") if snapshot.sysctls else None
    previous_lengths: dict[int, int] = {}
    if window.previous is not None and window.previous.sockets is not None:
        previous_lengths = {
            lsn.inode: lsn.queue_length for lsn in window.previous.sockets.listeners
        }
    for group in listener_groups(snapshot):
        worst = max(group.sockets, key=fill_ratio)
        fill = fill_ratio(worst)
        severity = ratio_severity(fill, thresholds)
        if worst.queue_length == 0 or severity is None:
            continue
        owner = owner_of(snapshot, worst.inode)
        evidence: dict[str, EvidenceValue] = {
            "listener": group.name,
            "queue_length": worst.queue_length,
            "queue_max": worst.queue_max,
            "fill_ratio": round(min(fill, 9.99), 4),
        }
        owner_evidence(evidence, owner)
        if worst.inode in previous_lengths:
            evidence["queue_length_at_window_start"] = previous_lengths[worst.inode]
        if len(group.sockets) > 1:
            evidence["reuseport_sockets"] = len(group.sockets)
            evidence["reuseport_sockets_at_threshold"] = sum(
                1 for lsn in group.sockets if lsn.queue_length and fill_ratio(lsn) >= warning
            )
        if somaxconn is not None:
            evidence["somaxconn"] = somaxconn
        overflows = window.counter_delta("TcpExtListenOverflows")
        if overflows is not None:
            evidence["listen_overflows_in_window"] = overflows
        dropped = drops_in_window(window, group)
        if dropped is not None:
            evidence["drops_in_window"] = dropped
        netns = snapshot.netns
        bigger = suggested_backlog(worst.queue_max)
        lines = [
            comment(
                f"{process_phrase(owner)} is not calling accept() fast enough: check that it is "
                "alive and not blocked (CPU, a stuck event loop, too few workers/threads)"
            ),
        ]
        hint = busy_owner_hint(owner)
        if hint is not None:
            lines.append(hint)
        lines += [
            run_in(netns, f"ss -ltnm 'sport = :{group.port}'") + "   # Recv-Q / Send-Q, d<N>",
            "# a bigger backlog only absorbs bursts:",
        ]
        if somaxconn is not None and bigger > somaxconn:
            lines.append(sysctl_fix(netns, "net.core.somaxconn", bigger, window.persisted_sysctls))
        lines.append(backlog_hint(owner, group.port, bigger))
        title = (
            f"accept queue {'full' if severity == 'critical' else 'filling'} on {group.name}: "
            f"{worst.queue_length} of {worst.queue_max} ({process_label(owner)})"
        )
        yield Q01.finding(
            window, title, evidence, "\n".join(lines), subject=group.name, severity=severity
        )


# --- Q03 -------------------------------------------------------------------------------------


@rule(
    "Q03",
    "backlog-capped",
    "warning",
    "A filling listener's backlog equals net.core.somaxconn: the application may have been cut",
    thresholds=(
        Threshold(
            "pressure",
            0.5,
            0.01,
            1.0,
            "ratio",
            "a capped listener whose accept queue is at least this full is a warning, "
            "otherwise info",
        ),
    ),
    sysctls=("net.core.somaxconn",),
)
def Q03(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    if snapshot.sysctls is None:
        return
    somaxconn = snapshot.sysctls.get("net.core.somaxconn")
    if somaxconn is None:
        return
    pressure = required(thresholds, "pressure")
    for group in listener_groups(snapshot):
        capped = [lsn for lsn in group.sockets if lsn.queue_max == somaxconn]
        if not capped:
            continue
        worst = max(capped, key=fill_ratio)
        fill = fill_ratio(worst)
        owner = owner_of(snapshot, worst.inode)
        # A backlog equal to somaxconn is also what Go servers and listen(fd, -1) ask for, so a
        # calm capped listener says nothing; it matters once its queue fills.
        if not (worst.queue_length and fill >= pressure):
            continue
        severity: Severity = "warning"
        evidence: dict[str, EvidenceValue] = {
            "listener": group.name,
            "queue_max": worst.queue_max,
            "somaxconn": somaxconn,
            "queue_length": worst.queue_length,
            "fill_ratio": round(min(fill, 9.99), 4),
        }
        owner_evidence(evidence, owner)
        bigger = suggested_backlog(somaxconn)
        lines = [
            "# the backlog the application asked for is unknown (the kernel keeps only the "
            "capped value); if it asked for more than somaxconn, raise somaxconn:",
            sysctl_fix(snapshot.netns, "net.core.somaxconn", bigger, window.persisted_sysctls),
            "# the cap is applied at listen(): restart or reload the service afterwards",
            backlog_hint(owner, group.port, bigger),
        ]
        title = (
            f"backlog of {group.name} ({process_label(owner)}) is capped at somaxconn "
            f"{somaxconn}"
            + (f" and its accept queue is {fill:.0%} full" if severity == "warning" else "")
        )
        yield Q03.finding(
            window, title, evidence, "\n".join(lines), subject=group.name, severity=severity
        )


# --- Q04 -------------------------------------------------------------------------------------


@rule(
    "Q04",
    "syn-queue-pressure",
    "warning",
    "A listener's SYN queue is filling, or SYN-queue drops / SYN cookies grew during the window",
    thresholds=(
        Threshold(
            "warning",
            0.8,
            0.01,
            1.0,
            "ratio",
            "SYN_RECV entries / the listener's SYN-queue limit for a warning",
        ),
    ),
    sysctls=("net.ipv4.tcp_syncookies", "net.ipv4.tcp_max_syn_backlog"),
    counters=("TcpExtTCPReqQFullDrop", "TcpExtTCPReqQFullDoCookies", "TcpExtSyncookiesSent"),
)
def Q04(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    warning = required(thresholds, "warning")
    snapshot = window.current
    syncookies = snapshot.sysctls.get("net.ipv4.tcp_syncookies") if snapshot.sysctls else None
    max_syn_backlog = (
        snapshot.sysctls.get("net.ipv4.tcp_max_syn_backlog") if snapshot.sysctls else None
    )
    netns = snapshot.netns
    for group in listener_groups(snapshot):
        syn_recv = sum(lsn.syn_recv for lsn in group.sockets)
        if syn_recv == 0:
            continue
        if syncookies == 0:
            limit = sum(
                no_cookie_syn_limit(lsn.queue_max, max_syn_backlog) for lsn in group.sockets
            )
        else:
            limit = sum(lsn.queue_max for lsn in group.sockets)
        fill = syn_recv / max(limit, 1)
        if fill < warning:
            continue
        owner = owner_of(snapshot, group.sockets[0].inode)
        evidence: dict[str, EvidenceValue] = {
            "listener": group.name,
            "syn_recv": syn_recv,
            "syn_queue_limit": limit,
            "fill_ratio": round(min(fill, 9.99), 4),
        }
        owner_evidence(evidence, owner)
        if syncookies is not None:
            evidence["tcp_syncookies"] = syncookies
        if max_syn_backlog is not None:
            evidence["tcp_max_syn_backlog"] = max_syn_backlog
        lines = [
            "# many half-open connections: a SYN flood, or clients whose final ACK is lost "
            "(a firewall dropping it)",
            run_in(netns, f"ss -tn state syn-recv 'sport = :{group.port}' | head -20"),
        ]
        if syncookies != 1:
            lines.append("# turn SYN cookies on so a full SYN queue does not drop clients:")
            lines.append(sysctl_fix(netns, "net.ipv4.tcp_syncookies", 1, window.persisted_sysctls))
        lines.append("# the SYN queue holds as many as the listen() backlog:")
        lines.append(backlog_hint(owner, group.port, suggested_backlog(group.sockets[0].queue_max)))
        yield Q04.finding(
            window,
            f"SYN queue of {group.name} at {fill:.0%}: {syn_recv} half-open of {limit} "
            f"({process_label(owner)})",
            evidence,
            "\n".join(lines),
            subject=group.name,
        )
    drops = window.counter_delta("TcpExtTCPReqQFullDrop")
    cookies = window.counter_delta("TcpExtTCPReqQFullDoCookies")
    sent = window.counter_delta("TcpExtSyncookiesSent")
    if syncookies == 2:
        # Every SYN gets a cookie in this mode (K02): cookie counters say nothing of pressure.
        cookies = sent = None
    if not (drops or cookies or sent):
        return
    evidence = {}
    if drops is not None:
        evidence["tcp_req_q_full_drop_in_window"] = drops
    if cookies is not None:
        evidence["tcp_req_q_full_do_cookies_in_window"] = cookies
    if sent is not None:
        evidence["syncookies_sent_in_window"] = sent
    evidence["window_seconds"] = round(window.seconds or 0.0, 3)
    if syncookies is not None:
        evidence["tcp_syncookies"] = syncookies
    severity: Severity = "critical" if drops else "warning"
    # The SYN-queue counters are the namespace's; the listeners that dropped during the window,
    # or hold the most half-open connections now, are where it happened.
    suspects = [(group, f"{count} dropped") for group, count in dropping_listeners(window)[:3]] or [
        (group, f"{sum(lsn.syn_recv for lsn in group.sockets)} half-open")
        for group in sorted(
            listener_groups(snapshot), key=lambda g: -sum(lsn.syn_recv for lsn in g.sockets)
        )[:3]
        if any(lsn.syn_recv for lsn in group.sockets)
    ]
    named = [
        f"{group.name} {process_label(owner_of(snapshot, group.sockets[0].inode))} ({what})"
        for group, what in suspects
    ]
    if named:
        evidence["listeners"] = ", ".join(named)
    lines = ["# a SYN queue overflowed: find the listener with many SYN-RECV entries:"]
    if suspects:
        lines.append(
            run_in(netns, f"ss -tn state syn-recv 'sport = :{suspects[0][0].port}' | head -20")
        )
    else:
        lines.append(
            run_in(
                netns, "ss -tn state syn-recv | awk 'NR>1 {print $3}' | sort | uniq -c | sort -rn"
            )
        )
    if drops:
        lines.append("# SYNs were dropped, not answered with cookies:")
        lines.append(sysctl_fix(netns, "net.ipv4.tcp_syncookies", 1, window.persisted_sysctls))
    lines.append(
        "# verify: " + run_in(netns, "nstat -az TcpExtTCPReqQFullDrop TcpExtSyncookiesSent")
    )
    where = f" at {named[0]}" if named else ""
    title = (
        f"{drops} SYNs dropped because a SYN queue was full during the window{where}"
        if drops
        else f"a SYN queue overflowed during the window{where}; SYN cookies were sent"
    )
    yield Q04.finding(window, title, evidence, "\n".join(lines), severity=severity)
