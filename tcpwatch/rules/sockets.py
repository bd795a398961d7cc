"""S rules: sockets in states that say an application or a path is broken."""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.endpoints import endpoint
from tcpwatch.model import ProcessRef
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
    comment,
    manual_reservation,
    owner_of,
    process_label,
    process_phrase,
    process_subject,
    reserve_ports_fix,
    run_in,
)
from tcpwatch.rules.shared import full_queue, local_listener

# --- S01 -------------------------------------------------------------------------------------


def _owner_key(owner: ProcessRef | None) -> tuple[int, str]:
    return (-1, "") if owner is None else (owner.pid, owner.name)


@rule(
    "S01",
    "close-wait-leak",
    "warning",
    "A process holds many CLOSE_WAIT sockets: it does not close connections its peers closed",
    thresholds=(
        Threshold(
            "warning", 50, 1, 1e7, "sockets", "CLOSE_WAIT sockets held by one process to warn"
        ),
        Threshold(
            "stale_seconds",
            300,
            10,
            86400,
            "seconds",
            "a CLOSE_WAIT socket seen this long by the daemon counts as stale",
        ),
        Threshold(
            "critical",
            50,
            1,
            1e7,
            "sockets",
            "stale CLOSE_WAIT sockets of one process for critical (needs daemon history)",
        ),
    ),
)
def S01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    sockets = snapshot.sockets
    if sockets is None:
        return
    warning = required(thresholds, "warning")
    stale_after = required(thresholds, "stale_seconds")
    critical = required(thresholds, "critical")
    netns = snapshot.netns
    inodes = sockets.inodes_by_state.get("close_wait")
    if inodes is None or snapshot.attribution is None:
        # Without attribution the count still matters; say who cannot be named.
        total = sockets.total("close_wait")
        if total >= warning:
            yield S01.finding(
                window,
                f"{total} sockets in CLOSE_WAIT (process attribution unavailable)",
                {"close_wait_sockets": total, "process": "unknown", "attribution": "unavailable"},
                "\n".join(
                    [
                        "# find the processes holding them:",
                        run_in(netns, "ss -tnp state close-wait | head -50"),
                        "# the owner must close() sockets whose peer closed (read() returned 0)",
                    ]
                ),
            )
        return
    by_owner: dict[ProcessRef | None, list[int]] = {}
    for inode in inodes:
        by_owner.setdefault(owner_of(snapshot, inode), []).append(inode)
    before: frozenset[int] = frozenset()
    if window.previous is not None and window.previous.sockets is not None:
        before = window.previous.sockets.inodes_by_state.get("close_wait", frozenset())
    first_seen = window.close_wait_first_seen
    for owner, held in sorted(by_owner.items(), key=lambda item: _owner_key(item[0])):
        count = len(held)
        if count < warning:
            continue
        ages = [snapshot.taken_at - first_seen[inode] for inode in held if inode in first_seen]
        stale = sum(1 for age in ages if age >= stale_after)
        severity: Severity = "critical" if stale >= critical else "warning"
        label = process_label(owner)
        evidence: dict[str, EvidenceValue] = {}
        if owner is None:
            evidence["process"] = "unknown"
            evidence["attribution"] = (
                "complete: no process holds them"
                if snapshot.attribution.complete
                else "incomplete: not every process was scanned"
            )
        else:
            evidence["process"] = owner.name
            evidence["pid"] = owner.pid
        evidence["close_wait_sockets"] = count
        if window.previous is not None:
            evidence["still_close_wait_since_window_start"] = sum(
                1 for inode in held if inode in before
            )
        if ages:
            evidence["tracked_sockets"] = len(ages)
            evidence["oldest_seconds"] = round(max(ages), 1)
            evidence["stale_sockets"] = stale
            evidence["stale_after_seconds"] = stale_after
        grep = f" | grep 'pid={owner.pid},'" if owner is not None else ""
        remediation = "\n".join(
            [
                comment(
                    f"{process_phrase(owner)} does not close() connections after the peer "
                    "closed them (read() returned 0 / EOF); no kernel setting frees them, only "
                    "the application's close() or its exit"
                ),
                "# which peers (the upstream whose connections leak):",
                run_in(netns, "ss -tnp state close-wait")
                + grep
                + " | awk '{print $4}' | sort | uniq -c | sort -rn | head",
                "# fix the code path: close the socket on EOF, close HTTP response bodies, and "
                "let connection pools validate or expire idle connections",
                "# stopgap: restart the process (the kernel then finishes the connections)",
            ]
        )
        title = (
            f"{label} holds {count} CLOSE_WAIT sockets"
            + (f", {stale} of them for over {stale_after:g} s" if severity == "critical" else "")
            + ": it leaks connections its peers closed"
        )
        yield S01.finding(
            window, title, evidence, remediation, subject=process_subject(owner), severity=severity
        )


# --- S02 -------------------------------------------------------------------------------------


@rule(
    "S02",
    "self-connect",
    "critical",
    "A socket is connected to itself (local address:port equals remote address:port)",
    sysctls=("net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports"),
)
def S02(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    if snapshot.sockets is None:
        return
    for sock in snapshot.sockets.self_connects:
        name = endpoint(sock.address, sock.port)
        owner = owner_of(snapshot, sock.inode)
        evidence: dict[str, EvidenceValue] = {
            "address": sock.address,
            "port": sock.port,
            "state": sock.state,
            "inode": sock.inode,
        }
        if owner is None:
            evidence["process"] = "unknown"
        else:
            evidence["process"] = owner.name
            evidence["pid"] = owner.pid
        netns = snapshot.netns
        remediation = "\n".join(
            [
                f"# a client connected to {name} while nothing listened there, and the kernel "
                "chose that same port as its source port (TCP simultaneous open): the client "
                "talks to itself and the real service cannot bind the port",
                "# kill the socket (or restart the client):",
                run_in(netns, f"ss -K -tn src {name} dst {name}"),
                "# keep it from happening again: move the service port below "
                "ip_local_port_range, or reserve it:",
                reserve_ports_fix(netns, snapshot, window.persisted_sysctls)
                or manual_reservation(sock.port),
            ]
        )
        yield S02.finding(
            window,
            f"socket connected to itself on {name} ({process_label(owner)}, {sock.state})",
            evidence,
            remediation,
            subject=name,
        )


# --- S03 -------------------------------------------------------------------------------------


@rule(
    "S03",
    "syn-sent-pileup",
    "warning",
    "Many sockets in SYN_SENT to one destination: it is unreachable or filtering",
    thresholds=(
        Threshold("warning", 20, 1, 1e7, "sockets", "SYN_SENT sockets to one destination to warn"),
    ),
    sysctls=("net.ipv4.tcp_syncookies", "net.ipv4.tcp_max_syn_backlog"),
)
def S03(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    if snapshot.sockets is None:
        return
    warning = required(thresholds, "warning")
    before: dict[tuple[str, str, int], int] = {}
    if window.previous is not None and window.previous.sockets is not None:
        before = {
            (d.family, d.address, d.port): d.sockets for d in window.previous.sockets.syn_sent
        }
    netns = snapshot.netns
    for destination in snapshot.sockets.syn_sent:
        if destination.sockets < warning:
            continue
        name = endpoint(destination.address, destination.port)
        evidence: dict[str, EvidenceValue] = {
            "destination": name,
            "syn_sent_sockets": destination.sockets,
        }
        key = (destination.family, destination.address, destination.port)
        if key in before:
            evidence["syn_sent_at_window_start"] = before[key]
        group = local_listener(snapshot, destination)
        full = None if group is None else full_queue(snapshot, group)
        if group is None or full is None:
            yield S03.finding(
                window,
                f"{destination.sockets} connections to {name} stuck in SYN_SENT",
                evidence,
                _unreachable_remediation(netns, name, destination.address),
                subject=name,
            )
            continue
        # The destination is a listener of this very namespace whose queue is full: the
        # kernel drops the SYNs at it, so the network is fine and Q01 (or Q04) is the cause.
        owner = owner_of(snapshot, group.sockets[0].inode)
        evidence["local_listener"] = group.name
        evidence["listener_queue_length"] = max(lsn.queue_length for lsn in group.sockets)
        evidence["listener_queue_max"] = max(lsn.queue_max for lsn in group.sockets)
        evidence["listener_syn_recv"] = sum(lsn.syn_recv for lsn in group.sockets)
        evidence["full_queue"] = full
        if owner is None:
            evidence["process"] = "unknown"
        else:
            evidence["process"] = owner.name
            evidence["pid"] = owner.pid
        see = "Q01 accept-queue-full" if full == "accept" else "Q04 syn-queue-pressure"
        remediation = "\n".join(
            [
                comment(
                    f"{name} is a listener here ({process_label(owner)}) whose {full} queue is "
                    "full: the kernel drops the SYNs sent to it, so these clients wait and "
                    f"retry. The network is not at fault: see the {see} finding for "
                    f"{group.name} and make {process_phrase(owner)} accept() faster (more "
                    "workers, a bigger backlog)"
                ),
                run_in(netns, f"ss -ltn 'sport = :{group.port}'") + "   # Recv-Q / Send-Q",
                run_in(netns, "nstat -az TcpExtListenOverflows TcpExtListenDrops"),
                "# in the clients: a connect timeout and retries with backoff keep a saturated "
                "service from piling up requests",
            ]
        )
        yield S03.finding(
            window,
            f"{destination.sockets} connections to {name} stuck in SYN_SENT: its listener "
            f"here ({process_label(owner)}) has a full {full} queue ({see.split()[0]})",
            evidence,
            remediation,
            subject=name,
        )


def _unreachable_remediation(netns: str, name: str, address: str) -> str:
    return "\n".join(
        [
            f"# nothing answers SYNs to {name}: the host is down, a firewall drops them, "
            "or the route is wrong",
            "# which processes are trying:",
            run_in(netns, f"ss -tnp state syn-sent 'dst {name}'"),
            run_in(netns, f"ip route get {address}"),
            "# in the clients: set a connect timeout and retry with backoff so a dead "
            "backend does not pile up sockets",
        ]
    )
