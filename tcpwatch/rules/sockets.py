"""S rules: sockets in states that say an application or a path is broken."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tcpwatch.endpoints import endpoint
from tcpwatch.escape import shell_word
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
    busy_owner_hint,
    close_wait_hint,
    comment,
    dropped_before_listener,
    manual_reservation,
    owner_evidence,
    owner_of,
    process_label,
    process_phrase,
    process_subject,
    reserve_ports_fix,
    run_in,
)
from tcpwatch.rules.shared import LocalDestination, local_destination

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
    # A leak lasts: with a window, only sockets already in CLOSE_WAIT at its start count (a busy
    # client's CLOSE_WAIT that it closes a moment later is churn, not a leak).
    before: frozenset[int] | None = None
    previous = window.previous
    if previous is not None and previous.sockets is not None:
        before = previous.sockets.inodes_by_state.get("close_wait")
    if len(inodes if before is None else inodes & before) < warning:
        # No process, nor one program's processes together, can hold more than all of them:
        # nothing can fire, and no owner is read (check then looks for none: owner_needs.py).
        return
    by_owner: dict[ProcessRef | None, list[int]] = {}
    for inode in inodes:
        by_owner.setdefault(owner_of(snapshot, inode), []).append(inode)

    def lasting(held: list[int]) -> list[int]:
        return held if before is None else [inode for inode in held if inode in before]

    spread: dict[str, list[tuple[ProcessRef, list[int]]]] = {}
    for owner, held in sorted(by_owner.items(), key=lambda item: _owner_key(item[0])):
        if len(lasting(held)) >= warning:
            yield _s01_finding(window, thresholds, [(owner, held)], before)
        elif owner is not None and lasting(held):
            spread.setdefault(owner.name, []).append((owner, held))
    # One program whose many processes each hold a few (PostgreSQL's backend per session):
    # judged together, as the program.
    for holders in spread.values():
        if len(holders) > 1 and sum(len(lasting(held)) for _, held in holders) >= warning:
            yield _s01_finding(window, thresholds, holders, before)


def _s01_finding(
    window: Window,
    thresholds: Thresholds,
    holders: Sequence[tuple[ProcessRef | None, list[int]]],
    before: frozenset[int] | None,
) -> Finding:
    """One process (or one program's processes) holding CLOSE_WAIT sockets."""
    snapshot = window.current
    stale_after = required(thresholds, "stale_seconds")
    critical = required(thresholds, "critical")
    held = [inode for _, inodes in holders for inode in inodes]
    owner = holders[0][0]
    grouped = len(holders) > 1
    first_seen = window.close_wait_first_seen
    count = len(held)
    ages = [snapshot.taken_at - first_seen[inode] for inode in held if inode in first_seen]
    stale = sum(1 for age in ages if age >= stale_after)
    severity: Severity = "critical" if stale >= critical else "warning"
    label = owner.name if grouped and owner is not None else process_label(owner)
    evidence: dict[str, EvidenceValue] = {}
    if owner is None:
        evidence["process"] = "unknown"
        evidence["attribution"] = (
            "complete: no process holds them"
            if snapshot.attribution is not None and snapshot.attribution.complete
            else "incomplete: not every process was scanned"
        )
    elif grouped:
        pids = sorted(process.pid for process, _ in holders if process is not None)
        evidence["process"] = owner.name
        evidence["processes"] = len(pids)
        evidence["pids"] = ", ".join(map(str, pids[:5])) + (", ..." if len(pids) > 5 else "")
    else:
        evidence["process"] = owner.name
        evidence["pid"] = owner.pid
    evidence["close_wait_sockets"] = count
    if before is not None:
        evidence["still_close_wait_since_window_start"] = sum(1 for i in held if i in before)
    if ages:
        evidence["tracked_sockets"] = len(ages)
        evidence["oldest_seconds"] = round(max(ages), 1)
        evidence["stale_sockets"] = stale
        evidence["stale_after_seconds"] = stale_after
    netns = snapshot.netns
    if grouped and owner is not None:
        who = f"{len(holders)} {owner.name} processes"
        grep = f" | grep -F {shell_word(chr(34) + owner.name + chr(34))}"
    else:
        who = process_phrase(owner)
        grep = f" | grep 'pid={owner.pid},'" if owner is not None else ""
    lines = [
        comment(
            f"{who} {'do' if grouped else 'does'} not close() connections after the peer "
            "closed them (read() returned 0 "
            "/ EOF): a process busy elsewhere (a long query, a lock wait, a blocked worker) "
            "never reads its socket; no kernel setting frees them, only the application's "
            "close() or its exit"
        ),
    ]
    hint = close_wait_hint(owner)
    if hint is not None:
        lines.append(hint)
    lines += [
        "# which peers (the side that gave up):",
        run_in(netns, "ss -tnp state close-wait")
        + grep
        + " | awk '{print $4}' | sort | uniq -c | sort -rn | head",
    ]
    if hint is None:  # a program of its own kind says how to fix it above
        lines += [
            "# fix the code path: close the socket on EOF, close HTTP response bodies, and "
            "let connection pools validate or expire idle connections",
            "# stopgap: restart the process (the kernel then finishes the connections)",
        ]
    holds = f"{label} ({len(holders)} processes) hold" if grouped else f"{label} holds"
    title = (
        f"{holds} {count} CLOSE_WAIT sockets"
        + (f", {stale} of them for over {stale_after:g} s" if severity == "critical" else "")
        + ": connections their peers closed are left open"
    )
    # The subject is the program's name, never a pid (a label of tcpwatch_finding: a restart
    # must not make a new series); the title and the evidence carry the pids.
    subject = owner.name if grouped and owner is not None else process_subject(owner)
    return S01.finding(
        window, title, evidence, "\n".join(lines), subject=subject, severity=severity
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
        local = local_destination(window, destination.address, destination.port)
        if local is None:
            yield S03.finding(
                window,
                f"{destination.sockets} connections to {name} stuck in SYN_SENT",
                evidence,
                _unreachable_remediation(netns, name, destination.address),
                subject=name,
            )
            continue
        yield _s03_local(window, name, destination.sockets, evidence, local)


def _s03_local(
    window: Window,
    name: str,
    stuck: int,
    evidence: dict[str, EvidenceValue],
    local: LocalDestination,
) -> Finding:
    """SYN_SENT piling up towards an address of this very namespace: never the network."""
    snapshot = window.current
    netns = snapshot.netns
    group = local.group
    port = int(name.rsplit(":", 1)[1])
    if group is None:
        evidence["local_listener"] = "none"
        evidence["cause"] = "dropped before the listener"
        lines = dropped_before_listener(netns, name, port, None)
        title = f"{stuck} connections to {name} stuck in SYN_SENT: dropped on this host"
        return S03.finding(window, title, evidence, "\n".join(lines), subject=name)
    owner = owner_of(snapshot, group.sockets[0].inode)
    evidence["local_listener"] = group.name
    owner_evidence(evidence, owner)
    evidence["listener_queue_length"] = max(lsn.queue_length for lsn in group.sockets)
    evidence["listener_queue_max"] = max(lsn.queue_max for lsn in group.sockets)
    evidence["listener_syn_recv"] = sum(lsn.syn_recv for lsn in group.sockets)
    evidence["full_queue"] = local.full or "none"
    if local.dropped is not None:
        evidence["listener_drops_in_window"] = local.dropped
    label = process_label(owner)
    if not local.listener_dropping:
        evidence["cause"] = "dropped before the listener"
        lines = dropped_before_listener(netns, name, group.port, label)
        title = (
            f"{stuck} connections to {name} stuck in SYN_SENT: dropped on this host before its "
            f"listener ({label})"
        )
        return S03.finding(window, title, evidence, "\n".join(lines), subject=name)
    # The destination is a listener of this very namespace that drops SYNs: its queue is full
    # or overflows between polls. The network is fine; Q01/Q02 (or Q04) name the cause.
    evidence["cause"] = "listener dropping"
    if local.full == "SYN":
        see, what = "Q04 syn-queue-pressure", "its SYN queue is full"
    elif local.full == "accept":
        see, what = "Q01 accept-queue-full", "its accept queue is full"
    else:
        see = "Q02 listen-overflows"
        what = f"it dropped {local.dropped} connection attempts in the window"
    lines = [
        comment(
            f"{name} is a listener here ({label}) and {what}: the kernel drops the SYNs sent "
            "to it, so these clients wait and retry. The network is not at fault: see the "
            f"{see} finding for {group.name} and make {process_phrase(owner)} accept() faster "
            "(more workers, a higher connection limit, a bigger backlog)"
        ),
    ]
    hint = busy_owner_hint(owner)
    if hint is not None:
        lines.append(hint)
    lines += [
        run_in(netns, f"ss -ltnm 'sport = :{group.port}'") + "   # Recv-Q / Send-Q, d<N>",
        run_in(netns, "nstat -az TcpExtListenOverflows TcpExtListenDrops"),
        "# in the clients: a connect timeout and retries with backoff keep a saturated "
        "service from piling up requests",
    ]
    title = (
        f"{stuck} connections to {name} stuck in SYN_SENT: its listener here ({label}) "
        f"drops them ({see.split()[0]})"
    )
    return S03.finding(window, title, evidence, "\n".join(lines), subject=name)


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
