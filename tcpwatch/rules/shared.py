"""What the rule topic modules share: kernel constants, a namespace's listeners looked up, and a
live peer's owner and evidence (the W rules).

The bottom of ``tcpwatch/rules/`` with ``base``, ``fixes``, ``shapes`` and ``peers``: a topic
module (the modules that declare rules) imports from these, never from another topic module,
so a new rule or a new topic module never has to reach into a sibling for a helper.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tcpwatch.endpoints import endpoint
from tcpwatch.model import Destination, Listener, ProcessRef, Snapshot
from tcpwatch.rules.base import EvidenceValue, Threshold, Window
from tcpwatch.rules.fixes import owner_of
from tcpwatch.rules.peers import PeerWindow, add_owner, peer_windows, split_peer
from tcpwatch.stalls import ClosedWaits, LiveConnection, LivePeer, Stalls, live_peers

TIME_WAIT_SECONDS = 60  # TCP_TIMEWAIT_LEN in include/net/tcp.h; no sysctl changes it

_WILDCARDS = {"ipv4": ("0.0.0.0", "::"), "ipv6": ("::",)}  # "::" takes IPv4 unless v6only


def no_cookie_syn_limit(queue_max: int, max_syn_backlog: int | None) -> int:
    """Request sockets a listener holds before it drops unproven peers, with tcp_syncookies=0.

    The SYN queue is full past the listener's backlog; without cookies the kernel also drops
    SYNs from peers it has no history with once fewer than a quarter of tcp_max_syn_backlog
    slots remain (tcp_conn_request() in net/ipv4/tcp_input.c).
    """
    if max_syn_backlog is None:
        return queue_max
    return min(queue_max, max_syn_backlog - (max_syn_backlog >> 2))


@dataclass(frozen=True, slots=True)
class ListenerGroup:
    """The sockets listening on one address:port (several with SO_REUSEPORT)."""

    family: str
    address: str
    port: int
    sockets: tuple[Listener, ...]

    @property
    def name(self) -> str:
        return endpoint(self.address, self.port)


def listener_groups(snapshot: Snapshot) -> tuple[ListenerGroup, ...]:
    if snapshot.sockets is None:
        return ()
    grouped: dict[tuple[str, str, int], list[Listener]] = {}
    for listener in snapshot.sockets.listeners:
        grouped.setdefault((listener.family, listener.address, listener.port), []).append(listener)
    return tuple(
        ListenerGroup(family, address, port, tuple(members))
        for (family, address, port), members in sorted(
            grouped.items(), key=lambda item: (item[0][2], item[0][0], item[0][1])
        )
    )


def fill_ratio(listener: Listener) -> float:
    """Accept-queue length / backlog. Full means the next connection overflows: length >= max
    (the length can read max+1)."""
    return listener.queue_length / max(listener.queue_max, 1)


def drops_in_window(window: Window, group: ListenerGroup) -> int | None:
    """Connection attempts the kernel dropped at the listener's sockets during the window (their
    sk_drops now minus at the window's start). A socket that is new since then counts from 0.
    None without a window, or when the kernel did not report the counts."""
    before_snapshot = window.previous
    if before_snapshot is None or before_snapshot.sockets is None:
        return None
    before = {lsn.inode: lsn.drops for lsn in before_snapshot.sockets.listeners}
    total = 0
    for lsn in group.sockets:
        start = before.get(lsn.inode, 0)
        if lsn.drops is None or start is None:
            return None
        total += lsn.drops - start if lsn.drops >= start else lsn.drops  # re-created: from 0
    return total


def dropping_listeners(window: Window) -> tuple[tuple[ListenerGroup, int], ...]:
    """The listeners that dropped connection attempts during the window, most drops first."""
    found = []
    for group in listener_groups(window.current):
        drops = drops_in_window(window, group)
        if drops:
            found.append((group, drops))
    return tuple(sorted(found, key=lambda item: (-item[1], item[0].port, item[0].address)))


def is_local(snapshot: Snapshot, address: str) -> bool:
    """Whether ``address`` is this namespace's own (see :func:`local_listener`)."""
    return _is_local(snapshot, address)


def _is_local(snapshot: Snapshot, address: str) -> bool:
    """Loopback, or an address this namespace uses: a listener bound to it or the source of an
    outbound connection (the snapshot carries no interface list)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(parsed, "ipv4_mapped", None)
    if parsed.is_loopback or (mapped is not None and mapped.is_loopback):
        return True
    sockets = snapshot.sockets
    if sockets is None:
        return False
    return any(lsn.address == address for lsn in sockets.listeners) or any(
        use.source == address for use in sockets.ephemeral_use
    )


def local_listener(snapshot: Snapshot, destination: Destination) -> ListenerGroup | None:
    """The listener of this namespace a destination reaches: its exact address:port, else a
    wildcard listener on the port when the address is local."""
    groups = [group for group in listener_groups(snapshot) if group.port == destination.port]
    exact = next((g for g in groups if g.address == destination.address), None)
    if exact is not None or not _is_local(snapshot, destination.address):
        return exact
    wildcards = _WILDCARDS.get(destination.family, ())
    return next((g for w in wildcards for g in groups if g.address == w), None)


def full_queue(snapshot: Snapshot, group: ListenerGroup) -> str | None:
    """ "accept" when a socket of the group has its accept queue full (the kernel drops SYNs
    then), "SYN" when its SYN queue is full without SYN cookies, else None."""
    if any(lsn.queue_length and lsn.queue_length >= lsn.queue_max for lsn in group.sockets):
        return "accept"
    sysctls = snapshot.sysctls
    if sysctls is None or sysctls.get("net.ipv4.tcp_syncookies") != 0:
        return None  # with cookies a full SYN queue still answers
    max_syn_backlog = sysctls.get("net.ipv4.tcp_max_syn_backlog")
    limit = sum(no_cookie_syn_limit(lsn.queue_max, max_syn_backlog) for lsn in group.sockets)
    return "SYN" if sum(lsn.syn_recv for lsn in group.sockets) >= max(limit, 1) else None


@dataclass(frozen=True, slots=True)
class LocalDestination:
    """A destination that is this namespace's own address, and what its listener did."""

    group: ListenerGroup | None  # the listener it reaches; None: nothing listens on the port
    full: str | None  # full_queue() of the listener now
    dropped: int | None  # connection attempts the listener dropped during the window

    @property
    def listener_dropping(self) -> bool:
        """The listener itself drops the SYNs (a full queue now, or drops in the window)."""
        return self.group is not None and bool(self.full or self.dropped)


def local_destination(window: Window, address: str, port: int) -> LocalDestination | None:
    """What this namespace knows of a destination of its own (loopback, or an address a
    listener or a connection uses); None for a destination elsewhere."""
    snapshot = window.current
    family = "ipv6" if ":" in address else "ipv4"
    group = local_listener(snapshot, Destination(family, address, port, 0))
    if group is None and not _is_local(snapshot, address):
        return None
    if group is None:
        return LocalDestination(None, None, None)
    return LocalDestination(group, full_queue(snapshot, group), drops_in_window(window, group))


# --- live peers: what the W rules (slowness.py, throughput.py) share --------------------------

WORST_SHOWN = 3  # connections named in a finding's evidence


def size_text(value: float) -> str:
    """Bytes for people: "512 B", "64.0 KiB", "4.1 MiB"."""
    if value < 1024:
        return f"{value:.0f} B"
    if value < 1 << 20:
        return f"{value / 1024:.1f} KiB"
    return f"{value / (1 << 20):.1f} MiB"


def peer_owner(snapshot: Snapshot, peer: LivePeer) -> ProcessRef | None:
    """Who holds the peer's local end: a listener's owner (inbound), else the owner of the first
    of its worst connections that has one (outbound)."""
    if peer.inode:
        return owner_of(snapshot, peer.inode)
    for connection in peer.stalls.worst:
        owner = owner_of(snapshot, connection.inode)
        if owner is not None:
            return owner
    return None


def subject_key(peer: LivePeer) -> str:
    return "listener" if peer.direction == "inbound" else "destination"


def base_evidence(
    window: Window, peer: LivePeer, owner: ProcessRef | None
) -> dict[str, EvidenceValue]:
    evidence: dict[str, EvidenceValue] = {
        subject_key(peer): peer.peer,
        "direction": peer.direction,
        "connections": peer.stalls.connections,
    }
    add_owner(evidence, [owner] if owner is not None else [])
    scan = window.current.inbound
    if peer.direction == "inbound" and scan is not None and not scan.complete:
        evidence["connections_scanned"] = scan.connections  # a sample: the limit cut the scan
    return evidence


def add_times(evidence: dict[str, EvidenceValue], stalls: Stalls) -> None:
    if stalls.busy_seconds is not None:
        evidence["busy_seconds"] = round(stalls.busy_seconds, 3)
    if stalls.rwnd_limited_seconds is not None:
        evidence["rwnd_limited_seconds"] = round(stalls.rwnd_limited_seconds, 3)
    if stalls.sndbuf_limited_seconds is not None:
        evidence["sndbuf_limited_seconds"] = round(stalls.sndbuf_limited_seconds, 3)


def describe(connection: LiveConnection, inbound: bool) -> str:
    """One connection for the evidence: the far end (inbound: the client), what waits, why."""
    parts = [f"Send-Q {size_text(connection.send_queue)}"]
    if connection.receive_queue:
        parts.append(f"Recv-Q {size_text(connection.receive_queue)}")
    if connection.zero_window:
        parts.append("peer window 0")
    elif connection.peer_window is not None:
        parts.append(f"peer window {size_text(connection.peer_window)}")
    busy = connection.busy_seconds
    if busy and connection.rwnd_limited_seconds is not None:
        parts.append(f"{connection.rwnd_limited_seconds / busy:.0%} waiting on it")
    name = connection.remote if inbound else f"{connection.local} -> {connection.remote}"
    return f"{name} ({', '.join(parts)})"


def ss_filter(peer: LivePeer) -> str:
    """The ``ss`` filter selecting a peer's connections: a listener's by its port."""
    if peer.direction == "inbound":
        return f"'( sport = :{split_peer(peer.peer)[1]} )'"
    return f"'dst {peer.peer}'"


def busy_share(stalls: Stalls, limited: float | None, minimum_busy: float) -> float | None:
    if stalls.busy_seconds is None or stalls.busy_seconds < minimum_busy:
        return None
    return stalls.share(limited)


def busy_thresholds(warning: float, what: str) -> tuple[Threshold, Threshold]:
    return (
        Threshold(
            "warning",
            warning,
            0.01,
            1.0,
            "ratio",
            f"share of the peer's sending time spent waiting on {what} to report it",
        ),
        Threshold(
            "minimum_busy_seconds",
            1.0,
            0.0,
            1e9,
            "seconds",
            "busy time summed over the peer's live connections before the share is judged",
        ),
    )


# --- closed connections beside the live ones (W01, W03, W04) ----------------------------------

# A peer with no live connection at the scan: what is left is its closed connections' record.
NO_LIVE = Stalls(0, None, None, None, 0, 0, 0, 0, 0, 0, None, 0, None, None)


def slow_candidates(window: Window) -> list[tuple[LivePeer, PeerWindow | None]]:
    """Each live peer with what its connections that closed did in the window (None: none did,
    or no window), then the peers with closed connections that were busy in the window and
    none live now, as a LivePeer without connections (a listener's carries the inode of its
    first socket, so its owner is named). Short connections (a download that ends between two
    scans) are seen only this way."""
    snapshot = window.current
    closed = {
        (item.direction, item.peer): item
        for direction in ("inbound", "outbound")
        for item in peer_windows(window, direction)
    }
    found = [
        (peer, closed.pop((peer.direction, peer.peer), None))
        for peer in live_peers(snapshot.sockets, snapshot.inbound)
    ]
    groups = {group.name: group for group in listener_groups(snapshot)}
    for (direction, name), item in sorted(closed.items()):
        if not item.waits.busy_us:
            continue
        group = groups.get(name) if direction == "inbound" else None
        inode = group.sockets[0].inode if group is not None else 0
        found.append((LivePeer(direction, name, NO_LIVE, inode), item))
    return found


def closed_waits(item: PeerWindow | None, minimum_busy: float) -> ClosedWaits | None:
    """What the peer's connections that closed in the window waited on, once they were busy
    for ``minimum_busy`` seconds in all (else None: too little to judge a share)."""
    if item is None or item.waits.busy_us < max(minimum_busy, 1e-6) * 1e6:
        return None
    return item.waits


def add_closed(evidence: dict[str, EvidenceValue], item: PeerWindow | None) -> None:
    """The closed connections' part of a W finding's evidence."""
    if item is None or not item.attempts:
        return
    waits = item.waits
    evidence["closed_connections"] = item.attempts
    evidence["closed_busy_seconds"] = round(waits.busy_us / 1e6, 3)
    evidence["closed_rwnd_limited_seconds"] = round(waits.rwnd_limited_us / 1e6, 3)
    evidence["closed_sndbuf_limited_seconds"] = round(waits.sndbuf_limited_us / 1e6, 3)
    evidence["zero_window_closes"] = waits.zero_window_closes
