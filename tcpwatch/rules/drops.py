"""Q02: connection attempts the kernel dropped at listeners during the window.

Each listening socket counts its own drops (sk_drops, read with each poll; docs/kernel-facts.md),
so drops are judged per listener, where the queue gauges of Q01 can miss them: a listener that
keeps accepting drains and refills its queue between polls. The namespace's ListenOverflows and
ListenDrops tell what dropped them, and stand in for listeners that closed during the window.
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
from tcpwatch.rules.shared import ListenerGroup, drops_in_window, fill_ratio, listener_groups
from tcpwatch.rules.tracewindow import drops_in

# --- Q02 -------------------------------------------------------------------------------------


def drop_cause(overflows: int | None, drops: int | None) -> str:
    """What the namespace's counters say the listen drops of the window were: "accept" (the
    accept queue overflowed: ListenOverflows grew as much as ListenDrops, or most of it), "syn"
    (ListenOverflows did not grow: dropped before the accept queue), "accept and syn", or
    "unknown"."""
    if overflows is None or not drops:
        return "unknown"
    if overflows == 0:
        return "syn"
    return "accept" if overflows * 2 >= drops else "accept and syn"


def _q02_listener(
    window: Window, group: ListenerGroup, dropped: int, cause: str, evidence_extra: dict[str, int]
) -> Finding:
    snapshot = window.current
    worst = max(group.sockets, key=fill_ratio)
    owner = owner_of(snapshot, worst.inode)
    seconds = window.seconds or 0.0
    evidence: dict[str, EvidenceValue] = {"listener": group.name}
    owner_evidence(evidence, owner)
    evidence["drops_in_window"] = dropped
    evidence["window_seconds"] = round(seconds, 3)
    if seconds > 0:
        evidence["drops_per_second"] = round(dropped / seconds, 3)
    evidence["cause"] = cause
    evidence["queue_length"] = worst.queue_length
    evidence["queue_max"] = worst.queue_max
    evidence["syn_recv"] = sum(lsn.syn_recv for lsn in group.sockets)
    evidence["drops_total"] = sum(lsn.drops or 0 for lsn in group.sockets)
    evidence.update(evidence_extra)
    # The kernel's own reason for packets dropped at this listener (tracepoints: a listener
    # started after tcpwatch is known by its socket; docs/tracepoints.md).
    reasons = {
        reason: count
        for (reason, listener), count in (drops_in(window) or {}).items()
        if listener == group.name
    }
    if reasons:
        evidence["drop_reasons"] = ", ".join(
            f"{reason} {count}" for reason, count in sorted(reasons.items())
        )
    netns = snapshot.netns
    label = process_label(owner)
    full_now = fill_ratio(worst) >= 1.0
    verify = [
        "# verify: the listener's drop counter (d<N> in skmem:) stops growing:",
        run_in(netns, f"ss -ltnm 'sport = :{group.port}'"),
    ]
    if cause == "syn":
        what = "SYNs dropped before its accept queue (its SYN queue; see Q04)"
        lines = [
            f"# the drops at {group.name} are not accept-queue overflows (ListenOverflows did "
            "not grow): SYNs were dropped before the accept queue, because its SYN queue is "
            "full (a SYN flood, or clients whose final ACK is lost) without SYN cookies "
            "answering; accepting connections sooner would not help: see Q04 and K01",
            run_in(netns, f"ss -tn state syn-recv 'sport = :{group.port}' | head -20"),
            *verify,
        ]
    else:
        what = f"its accept queue ({worst.queue_max}) overflowed"
        if not full_now:
            what += (
                f", though it reads {worst.queue_length} now: it drains and refills between polls"
            )
        lines = [
            comment(
                f"{process_phrase(owner)} does not take connections off the accept queue of "
                f"{group.name} as fast as they come: the kernel dropped {dropped} connection "
                f"attempts there in {seconds:.0f} s, and the clients wait for SYN retries (1 s, "
                "3 s, 7 s ...)"
            ),
        ]
        hint = busy_owner_hint(owner)
        if hint is not None:
            lines.append(hint)
        lines.append(
            "# make it accept() faster (more workers, a higher connection limit); a "
            "bigger backlog only absorbs bursts:"
        )
        somaxconn = snapshot.sysctls.get("net.core.somaxconn") if snapshot.sysctls else None
        bigger = suggested_backlog(worst.queue_max)
        if somaxconn is not None and bigger > somaxconn:
            lines.append(sysctl_fix(netns, "net.core.somaxconn", bigger, window.persisted_sysctls))
        lines.append(backlog_hint(owner, group.port, bigger))
        if cause == "accept and syn":
            lines.append("# some drops were SYN-queue drops, not overflows: see Q04")
        lines.extend(verify)
    if reasons:
        lines.insert(
            0,
            comment(
                f"the kernel's drop reasons at {group.name} in the window: "
                f"{evidence['drop_reasons']} (TCP_LISTEN_OVERFLOW: a handshake's last ACK "
                "found the accept queue full)"
            ),
        )
    title = f"{dropped} connection attempts dropped at {group.name} ({label}) in {seconds:.1f} s: "
    return Q02.finding(window, title + what, evidence, "\n".join(lines), subject=group.name)


def _listener_closed(window: Window) -> bool:
    """A listening socket present at the window's start is gone now."""
    start = window.previous
    now = window.current.sockets
    if start is None or start.sockets is None or now is None:
        return False
    current = {lsn.inode for lsn in now.listeners}
    return any(lsn.inode not in current for lsn in start.sockets.listeners)


@rule(
    "Q02",
    "listen-overflows",
    "warning",
    "Connections were dropped at a listener during the window (its drop counter, and "
    "ListenOverflows/ListenDrops for drops no listener accounts for)",
    thresholds=(
        Threshold(
            "minimum",
            1,
            1,
            1e9,
            "connections",
            "fire when a listener dropped at least this many connection attempts in the window "
            "(or ListenOverflows/ListenDrops grew by this much beyond what listeners dropped)",
        ),
    ),
    counters=("TcpExtListenOverflows", "TcpExtListenDrops"),
    sysctls=("net.core.somaxconn",),  # its fix raises the backlog up to it
)
def Q02(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    overflows = window.counter_delta("TcpExtListenOverflows")
    drops = window.counter_delta("TcpExtListenDrops")
    minimum = required(thresholds, "minimum")
    cause = drop_cause(overflows, drops)
    namespace: dict[str, int] = {}
    if overflows is not None:
        namespace["listen_overflows_in_window"] = overflows
    if drops is not None:
        namespace["listen_drops_in_window"] = drops
    accounted = 0
    unknown = False  # a listener whose drops the kernel did not report
    for group in listener_groups(window.current):
        dropped = drops_in_window(window, group)
        if dropped is None:
            unknown = True
            continue
        accounted += dropped
        if dropped >= minimum:
            yield _q02_listener(window, group, dropped, cause, namespace)
    if overflows is None and drops is None:
        return
    # The namespace's counters and the listeners' are read a moment apart in each poll, so they
    # never agree exactly under load: the rest is judged only when a listener closed during the
    # window, did not report its drops, or none accounts for any drop at all.
    if accounted and not (unknown or _listener_closed(window)):
        return
    lost = max(overflows or 0, drops or 0)
    rest = lost - accounted
    if rest < minimum:
        return
    # Drops no current listener accounts for: it closed during the window, or the kernel does
    # not report drops per listener.
    seconds = window.seconds or 0.0
    evidence: dict[str, EvidenceValue] = dict(namespace)
    evidence["drops_at_listeners_in_window"] = accounted
    evidence["unaccounted_in_window"] = rest
    evidence["window_seconds"] = round(seconds, 3)
    if seconds > 0:
        evidence["drops_per_second"] = round(rest / seconds, 3)
    full: list[str] = []
    for group in listener_groups(window.current):
        worst = max(group.sockets, key=fill_ratio)
        if worst.queue_length and fill_ratio(worst) >= 1.0:
            full.append(f"{group.name} {process_label(owner_of(window.current, worst.inode))}")
    evidence["listeners_full_now"] = ", ".join(full) if full else "none at the end of the window"
    netns = window.current.netns
    remediation = "\n".join(
        [
            "# these drops are not counted at any listener polled now: a listener that closed "
            "during the window, or a kernel that does not report drops per listener",
            "# find the listener whose drop counter (d<N>) grows, or whose Recv-Q reaches its "
            "Send-Q:",
            run_in(netns, "ss -ltnm"),
            "# verify: the counters stop growing:",
            run_in(netns, "nstat -az TcpExtListenOverflows TcpExtListenDrops"),
        ]
    )
    yield Q02.finding(
        window,
        f"{rest} incoming connection attempts dropped at listen sockets in {seconds:.1f} s "
        "that no current listener accounts for",
        evidence,
        remediation,
    )
