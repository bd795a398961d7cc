"""A window's worth of the destroy listener's per-peer counts, for the C rules.

``Snapshot.connections`` holds cumulative counts since the listener started
(docs/connections.md); these helpers take their difference over a rule's window. A peer absent
at the window's start counts from zero, and so does one whose counts went backwards (it was
evicted after being idle and came back, so everything it has now happened in the window). When
the listener itself restarted (its event count went backwards) there is no window. The
``other`` row folds many peers together and is never returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tcpwatch.model import OUTCOMES, PEER_OTHER, LifecycleStats, PeerStats, ProcessRef, Snapshot
from tcpwatch.rules.base import EvidenceValue, Window
from tcpwatch.rules.fixes import owner_of, process_label
from tcpwatch.stalls import ClosedWaits

FAILURES: tuple[str, ...] = ("timeout", "refused", "aborted")


@dataclass(frozen=True, slots=True)
class PeerWindow:
    """What one (direction, peer) did during the window."""

    direction: str
    peer: str
    closed: Mapping[str, int]  # outcome -> connections closed in the window
    rtt_count: int
    rtt_sum_seconds: float
    segments_sent: int
    segments_retransmitted: int
    waits: ClosedWaits = field(default_factory=ClosedWaits)  # where the sending time went

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
        or now.waits.went_back(before.waits)
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
            now.waits,
        )
    return PeerWindow(
        now.direction,
        now.peer,
        {o: now.closed.get(o, 0) - before.closed.get(o, 0) for o in OUTCOMES},
        now.rtt_count - before.rtt_count,
        max(now.rtt_sum_seconds - before.rtt_sum_seconds, 0.0),
        now.segments_sent - before.segments_sent,
        now.segments_retransmitted - before.segments_retransmitted,
        now.waits - before.waits,
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
    # A row the budget held back (not exported) goes on from its held value when it is back.
    earlier = {(p.direction, p.peer): p for p in (*before.held, *before.peers)}
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


def add_owner(evidence: dict[str, EvidenceValue], owners: list[ProcessRef]) -> None:
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
