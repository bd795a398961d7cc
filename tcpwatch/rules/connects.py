"""C01: connects to a destination that fail, from the connections that closed during the window.

It reads the destroy listener's per-peer counts over the window (:mod:`tcpwatch.rules.peers`)
and judges three kinds of destination apart:

* an address:port elsewhere: timeouts and refusals say the path, the remote host or its
  listener;
* an address:port of this namespace: never the network. Its listener drops the SYNs (a full
  queue, or drops during the window: Q01, Q02, Q04), or this host drops them before it (a local
  firewall rule), or nothing listens there;
* a bare address: failed connects whose port the kernel cleared because their client closed
  them abortively (haproxy and Envoy close a failed connect with SO_LINGER 0; a blocking
  connect() that fails too), which the tracepoints could not give their port back
  (tcpwatch/peer_join.py: the source is down, or missed them). They are judged on their own,
  against the connections to that address that were cut the same way, never against the
  healthy connections to its other ports (a dead backend behind a proxy that also serves
  healthy traffic on the same address).

Where the tracepoints saw the destination's failed connects, the finding names their errno and
the processes that made them (the destroy events say neither).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from tcpwatch.endpoints import endpoint
from tcpwatch.model import ProcessRef, Snapshot
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
from tcpwatch.rules.fixes import comment, dropped_before_listener, owner_of, process_label, run_in
from tcpwatch.rules.peers import (
    FAILURES,
    PeerWindow,
    add_owner,
    peer_windows,
    split_peer,
    syn_sent_owners,
)
from tcpwatch.rules.shapes import add_window, ratio_severity
from tcpwatch.rules.shared import LocalDestination, is_local, local_destination
from tcpwatch.rules.tracewindow import drops_in, failures_at

_CAUSES: dict[str, str] = {
    "timeout": "# timeout: no answer to the SYNs: a firewall or security group drops them, the "
    "route is wrong, the host is down, or the remote listener's SYN queue is full with "
    "tcp_syncookies=0 (K01/Q04 on that host) or its accept queue is full (Q01 there)",
    "refused": "# refused: answered with a reset: nothing listens on that port there, a firewall "
    "rejects with RST (nft/iptables `reject with tcp reset`), or the remote accept queue is full "
    "with tcp_abort_on_overflow=1 (K04 there)",
    "aborted": "# aborted: connects that failed (refused or timed out) and were closed "
    "abortively, so the kernel cleared their port",
}
WHY_PORT_UNKNOWN = (
    "the client closed its failed connects abortively (SO_LINGER 0, as haproxy and Envoy do) or "
    "used a blocking connect(): the kernel cleared the port before reporting"
)
# Programs measured (or documented) to close a failed connect abortively: the likely client of a
# bare-address failure when one of them listens in the namespace.
_ABORTIVE_CLIENTS = ("haproxy", "envoy")


def _common_tail(netns: str, where: str) -> list[str]:
    return [
        "# SYNs out, SYN-ACKs or resets back (30 s at most):",
        run_in(
            netns,
            f"timeout 30 tcpdump -ni any -c 50 '{where} and "
            "tcp[tcpflags] & (tcp-syn|tcp-rst) != 0'",
        ),
        "# the namespace's own count of failed connects, growing while this lasts:",
        run_in(netns, "nstat -az TcpAttemptFails"),
        "# in the clients: a connect timeout and retries with backoff keep a failing "
        "destination from piling up requests",
    ]


def _netfilter(window: Window, evidence: dict[str, EvidenceValue]) -> list[str]:
    """Packets a firewall rule of this namespace dropped in the window, from the tracepoints
    (skb:kfree_skb NETFILTER_DROP): a lead for SYNs that went unanswered."""
    drops = drops_in(window) or {}
    dropped = sum(count for (reason, _), count in drops.items() if reason == "NETFILTER_DROP")
    if not dropped:
        return []
    evidence["netfilter_drops_in_window"] = dropped
    return [
        comment(
            f"a firewall rule of this namespace dropped {dropped} packets during the window "
            "(the kernel's drop reason NETFILTER_DROP): look at its rules first"
        )
    ]


def _unjoined(window: Window, peers: Sequence[PeerWindow], judged: set[str]) -> dict[str, str]:
    """Bare addresses whose failed connects belong to one destination judged by name: the
    tracepoints saw the address's connects fail at that port alone in the window, and those
    the join missed (lost records, a loaded host) stayed bare. destination -> bare address: one
    finding for one problem, the bare count in its evidence."""
    found: dict[str, str] = {}
    for peer in peers:
        address, port = split_peer(peer.peer)
        if port is not None or not peer.failures:
            continue
        traced = {f.destination for f in failures_at(window, address)}
        if len(traced) == 1 and traced <= judged:
            found[traced.pop()] = peer.peer
    return found


def _traced(window: Window, peer: str, evidence: dict[str, EvidenceValue]) -> list[str]:
    """The errno and processes of the window's failed connects to ``peer``, from the
    tracepoints: the destroy events carry neither."""
    address, _ = split_peer(peer)
    found = [f for f in failures_at(window, address) if f.destination == peer]
    if not found:
        return []
    failed = found[0]
    errors = ", ".join(f"{count} {error}" for error, count in sorted(failed.errors.items()))
    evidence["connect_failures"] = f"{peer}: {errors} by {failed.processes}"
    return [comment(f"the kernel's tracepoints saw them fail: {errors}, by {failed.processes}")]


def _remote_remediation(
    window: Window, peer: str, closed: Mapping[str, int], evidence: dict[str, EvidenceValue]
) -> list[str]:
    netns = window.current.netns
    address, port = split_peer(peer)
    lines = [_CAUSES[outcome] for outcome in FAILURES if closed[outcome]]
    if closed["timeout"]:
        lines += _netfilter(window, evidence)
    lines += [
        "# which processes are trying now, and the route they take:",
        run_in(netns, f"ss -tnp state syn-sent 'dst {peer}'"),
        run_in(netns, f"ip route get {address}"),
    ]
    if closed["refused"]:
        lines.append(f"# on {address}: ss -ltn 'sport = :{port}' (is anything listening?)")
    return lines + _common_tail(netns, f"host {address} and tcp port {port}")


def _local_remediation(
    window: Window,
    peer: PeerWindow,
    local: LocalDestination,
    evidence: dict[str, EvidenceValue],
) -> list[str]:
    """A destination of this namespace: its listener, this host's rules, or nothing listening."""
    snapshot = window.current
    netns = snapshot.netns
    _, port = split_peer(peer.peer)
    assert port is not None
    group = local.group
    evidence["local_listener"] = group.name if group is not None else "none"
    label = process_label(owner_of(snapshot, group.sockets[0].inode)) if group else None
    if group is not None and local.listener_dropping:
        evidence["cause"] = "listener dropping"
        evidence["full_queue"] = local.full or "none"
        if local.dropped is not None:
            evidence["listener_drops_in_window"] = local.dropped
        see = {"accept": "Q01", "SYN": "Q04"}.get(local.full or "", "Q02")
        return [
            comment(
                f"{peer.peer} is a listener of this namespace ({label}) that drops the SYNs "
                f"sent to it: the network is not at fault; see the {see} finding for {group.name}"
            ),
            run_in(netns, f"ss -ltnm 'sport = :{group.port}'") + "   # Recv-Q / Send-Q, d<N>",
        ]
    if peer.closed["timeout"]:
        evidence["cause"] = "dropped before the listener"
        return [
            *_netfilter(window, evidence),
            *dropped_before_listener(netns, peer.peer, port, label),
            "# which processes are trying now:",
            run_in(netns, f"ss -tnp state syn-sent 'dst {peer.peer}'"),
        ]
    evidence["cause"] = "nothing listens" if group is None else "refused by this host"
    return [
        f"# {peer.peer} is on this host and answers with resets: "
        + ("nothing listens on that port" if group is None else "a local rule rejects them"),
        run_in(netns, f"ss -ltnp 'sport = :{port}'") + "   # is anything listening?",
    ]


def _abortive_clients(snapshot: Snapshot) -> list[ProcessRef]:
    """Listener owners here known to close failed connects abortively (haproxy, Envoy)."""
    found: set[ProcessRef] = set()
    if snapshot.sockets is not None:
        for lsn in snapshot.sockets.listeners:
            owner = owner_of(snapshot, lsn.inode)
            if owner is not None and owner.name.startswith(_ABORTIVE_CLIENTS):
                found.add(owner)
    return sorted(found, key=lambda owner: (owner.name, owner.pid))


def _other_ports(address: str, peers: Sequence[PeerWindow]) -> str:
    ported = [
        p for p in peers if split_peer(p.peer)[0] == address and split_peer(p.peer)[1] is not None
    ]
    ported.sort(key=lambda p: -p.attempts)
    return ", ".join(f"{p.peer} ({p.attempts} closed, {p.failures} failed)" for p in ported[:5])


def _bare_address(
    window: Window,
    peer: PeerWindow,
    peers: Sequence[PeerWindow],
    evidence: dict[str, EvidenceValue],
    owners: list[ProcessRef],
) -> tuple[str, list[str]]:
    """Failed connects whose port the kernel cleared: the title's tail and the remediation."""
    snapshot = window.current
    netns = snapshot.netns
    address = peer.peer
    traced = failures_at(window, address)
    if traced:  # the tracepoints kept what the destroy events lost: the port, errno, process
        evidence["port"] = ", ".join(str(split_peer(f.destination)[1]) for f in traced[:5])
        evidence["connect_failures"] = "; ".join(
            f"{f.destination}: "
            + ", ".join(f"{count} {error}" for error, count in sorted(f.errors.items()))
            + f" by {f.processes}"
            for f in traced[:5]
        )
    else:
        evidence["port"] = "unknown"
        evidence["why_port_unknown"] = WHY_PORT_UNKNOWN
    others = _other_ports(address, peers)
    if others:
        evidence["other_ports"] = others
    # Connects to this address waiting in SYN_SENT now keep their port: the likely failing one.
    waiting = (
        [d for d in snapshot.sockets.syn_sent if d.address == address]
        if snapshot.sockets is not None
        else []
    )
    if waiting:
        evidence["syn_sent_now"] = ", ".join(
            f"{endpoint(d.address, d.port)} ({d.sockets})" for d in waiting[:5]
        )
    proxies = _abortive_clients(snapshot) if not owners and not traced else []
    if proxies:
        evidence["client"] = ", ".join(process_label(p) for p in proxies)
    seconds = window.seconds or 0.0
    rate = peer.failures / seconds if seconds > 0 else 0.0
    if traced:
        first = traced[0]
        known = f"the kernel's tracepoints kept it: {evidence['connect_failures']}"
    else:
        known = f"which port of {address} fails is not known here"
    lines = [
        f"# {peer.failures} connects to {address} failed ({rate:.1f}/s) and were closed "
        "abortively (SO_LINGER 0: haproxy and Envoy close a failed connect this way, or a "
        "blocking connect() failed), so the kernel cleared their port from the destroy events; "
        + known,
        f"# judged on their own: {peer.closed['ok']} connections to {address} were cut the "
        "same way after working"
        + (f"; its other ports, not counted here: {others}" if others else ""),
    ]
    if waiting:
        lines.append(
            f"# connects to {evidence['syn_sent_now']} are in SYN_SENT now (sockets in "
            "parentheses), port included: the likely failing port (see S03)"
        )
    for proxy in proxies:
        lines.append(
            comment(
                f"the client is likely {process_label(proxy)} (it listens here and closes "
                f"failed connects abortively): a backend of it on {address} is down or "
                "filtered; its log names it ('Connection refused', 'Connection timed out'), and "
                "`show servers state` on its stats socket"
            )
        )
    if is_local(snapshot, address):
        lines.append(
            f"# {address} is an address of this host: the failing port is one of its own, "
            "where nothing listens (refused) or whose SYNs are dropped here; its listeners:"
        )
        lines.append(run_in(netns, "ss -ltnp"))
    lines += _common_tail(netns, f"host {address}")
    who = owners or proxies
    by = f" by {', '.join(process_label(o) for o in who)}" if who else ""
    if traced:
        errors = ", ".join(sorted(first.errors))
        tail = (
            f", {rate:.1f}/s: to {first.destination} by {first.processes}, {errors} (the "
            "client closed them abortively; the tracepoints kept the port)"
        )
        lines.insert(
            1,
            comment(
                f"the failing destination is {first.destination}, reached by "
                f"{first.processes}: {errors}"
            ),
        )
        return tail, lines
    tail = (
        f", {rate:.1f}/s{by}: port unknown, the kernel cleared it (the client closed them "
        "abortively)"
    )
    return tail, lines


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
            "connections to one destination closed in the window before it is judged (a bare "
            "address: failed connects)",
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
    netns = window.current.netns
    judged = {
        p.peer
        for p in peers
        if split_peer(p.peer)[1] is not None
        and p.failures
        and p.attempts >= minimum
        and ratio_severity(p.failures / p.attempts, thresholds) is not None
    }
    unjoined = _unjoined(window, peers, judged)
    for peer in peers:
        address, port = split_peer(peer.peer)
        attempts = peer.attempts
        if peer.failures == 0 or attempts < minimum or peer.peer in unjoined.values():
            continue
        ratio = peer.failures / attempts
        severity: Severity | None = ratio_severity(ratio, thresholds)
        if port is None:
            # A bare address's row holds only the connects whose port the kernel cleared: the
            # failed ones (aborted) and working ones a client cut abortively (ok), to any of the
            # address's ports. The failures are certain but their port is not, so they are
            # judged by their number: a proxy that cuts its healthy connections the same way
            # (haproxy with http-server-close) must not hide a dead backend behind them.
            if peer.failures < minimum:
                continue
            severity = "critical" if ratio >= required(thresholds, "critical") else "warning"
        if severity is None:
            continue
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
        what = ", ".join(f"{peer.closed[o]} {o}" for o in FAILURES if peer.closed[o])
        who = f" ({', '.join(process_label(o) for o in owners)})" if owners else ""
        title = (
            f"{peer.failures} of {attempts} connections to {peer.peer}{who} failed in "
            f"{seconds:.0f} s: {what}"
        )
        if port is None:
            tail, lines = _bare_address(window, peer, peers, evidence, owners)
            title += tail
        else:
            traced = _traced(window, peer.peer, evidence)
            bare = next((p for p in peers if p.peer == unjoined.get(peer.peer)), None)
            if bare is not None:
                evidence["unjoined"] = bare.failures
                traced.append(
                    comment(
                        f"and {bare.failures} more failed connects to {address} whose port the "
                        f"kernel cleared and no tracepoint record gave back (counted under "
                        f"{address}): the tracepoints lay them at this port"
                    )
                )
            local = local_destination(window, address, port)
            if local is None:
                lines = _remote_remediation(window, peer.peer, peer.closed, evidence)
            else:
                lines = _local_remediation(window, peer, local, evidence)
                lines += _common_tail(netns, f"host {address} and tcp port {port}")
            lines[1:1] = traced
        yield C01.finding(
            window, title, evidence, "\n".join(lines), subject=peer.peer, severity=severity
        )
