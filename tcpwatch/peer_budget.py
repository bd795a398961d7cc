"""The host-wide budget of per-peer series (collect.connection_peers): one bound for every
namespace and every source.

Two sources count per peer: each namespace's destroy listener (sources/lifecycle_peers.py: what
closed since the previous poll, per tracked (direction, peer)) and the host-wide tracepoint
reader (sources/tracepoints_tally.py: connects per (destination, process), resets, drops). Here,
once per poll and for all namespaces together, their counts are put together by peer
(peer_rows.py: a destination's closes, connect times and failures are one unit, granted, held
or folded as one) and places go to the peers that matter most, until the series they export
reach ``connection_peers`` x SERIES_PER_ROW (2,990 at the default); the rest of each
namespace's counts are folded into its ``"other"`` rows, and counted. Failed connects whose port
the kernel cleared get it back from the tracepoints first (peer_join.py).

Order: listeners of this host first (closes arrived on them, or packets were dropped at them),
then peers by score: what they counted, halved every minute, a failure weighing 20 closes (a
connection seen both closing and connecting counts once). A peer that holds a place keeps it
until a challenger is ``HYSTERESIS`` times busier, so two peers of about the same rate do not
trade a place every poll. The ``other`` rows are inside the budget: a namespace that folds
needs them, and when even those do not fit (more busy namespaces than room), the least busy
namespaces' counts are only counted in ``folded`` (tcpwatch_connections_folded_total,
tcpwatch_tracepoint_folded_total).

Counter semantics (docs/connections.md): every exported value only grows. A peer that loses its
place stops being exported (its series go stale) but is remembered; its counts go to ``other``
meanwhile, and when it wins a place again its series go on from the value they had, so rate()
and increase() over a gap read exactly what was counted under that peer (a restart from zero
could read as less than nothing happened). ``other`` counts only what was folded into it, never
a peer's past. A row that counted nothing for ``collect.connection_peer_idle`` is forgotten
(and a peer with it): were it to come back, its series start from zero, long after any rate()
window has lost their old samples.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

from tcpwatch.model import (
    DIRECTIONS,
    OUTCOMES,
    PEER_OTHER,
    RTT_BUCKETS_SECONDS,
    LifecycleStats,
    PeerStats,
    Snapshot,
)
from tcpwatch.peer_join import PortJoin
from tcpwatch.peer_rows import Prices, Rows
from tcpwatch.scores import SCORE_HALF_LIFE_SECONDS
from tcpwatch.tracepoint_stats import (
    TABLES,
    ConnectStats,
    DropStats,
    ResetStats,
    TracepointStats,
)

HYSTERESIS = 2.0
# What one row costs (docs/metrics.md, "Series arithmetic"): an outbound row has the four
# outcomes, the RTT histogram (its buckets, +Inf, sum and count) and one series per counter; an
# inbound row leaves out the two outcomes a listener's connections cannot have (timeout, refused:
# exported only once one happened). A counter added to every row is one more ROW_COUNTERS, and
# collect.connection_peers' default shrinks so rows x SERIES_PER_ROW stays within
# PEER_SERIES_TARGET (tests/unit/test_series_arithmetic.py holds all three to the exposition).
# segments sent and retransmitted, bytes sent and received, busy, rwnd- and sndbuf-limited
# seconds, zero-window closes
ROW_COUNTERS = 8
SERIES_PER_ROW = len(OUTCOMES) + len(RTT_BUCKETS_SECONDS) + 3 + ROW_COUNTERS  # 26
SERIES_PER_INBOUND_ROW = SERIES_PER_ROW - 2
PEER_SERIES_TARGET = 3000  # the per-peer series of a node at the default row budget

PRICES = Prices(SERIES_PER_ROW, SERIES_PER_INBOUND_ROW)
# Connect rows of one destination with a process label each; more processes share "other".
PROCESSES_PER_DESTINATION = 4


def series_budget(max_rows: int) -> int:
    """The per-peer series of the whole host: ``collect.connection_peers`` outbound rows' worth,
    shared by every per-peer family of every source."""
    return max(max_rows, 0) * SERIES_PER_ROW


def candidate_limit(max_rows: int) -> int:
    """Peers remembered per namespace without a row of their own yet (scored, waiting for a
    place): as many as the destroy listener tracks (twice the rows, at least 64)."""
    return max(64, 2 * max_rows)


class _Peer:
    __slots__ = ("exported", "last_active", "pending", "rows", "score", "traced", "tracked")

    def __init__(self, now: float) -> None:
        self.rows = Rows()  # cumulative, as exported (and going on from)
        self.pending: Rows | None = None  # this poll's counts
        self.score = 0.0
        self.exported = False
        self.tracked = False  # the destroy listener tracks one of its pairs (this poll)
        self.traced = False  # counted by name whatever the tracking (tracepoints, joins)
        self.last_active = now  # the latest poll it counted something

    def counts(self) -> Rows:
        if self.pending is None:
            self.pending = Rows()
        return self.pending

    def listener(self, name: str) -> bool:
        """One of this host's listeners: closes arrived on it, or packets were dropped at it
        (drops at no known listener are under the name "")."""
        rows = (self.rows, self.pending) if self.pending is not None else (self.rows,)
        return any("inbound" in r.conn or (r.drops and name) for r in rows)

    def processes(self) -> set[str]:
        """The processes with a connect row of their own (or about to have one)."""
        counts = self.pending.connects if self.pending is not None else {}
        return {p for p in (*self.rows.connects, *counts) if p != PEER_OTHER}


class _Namespace:
    __slots__ = (
        "folded", "gave_up", "join", "other", "other_active", "other_exported", "other_pending",
        "peers", "scored_at", "traced_folded",
    )  # fmt: skip

    def __init__(self) -> None:
        self.peers: dict[str, _Peer] = {}
        self.other = Rows()  # cumulative "other" rows
        self.other_pending = Rows()  # what the sources folded themselves, this poll
        self.other_active = float("-inf")  # the latest poll something was folded
        self.other_exported = False
        self.folded: Counter[str] = Counter()  # direction -> closes not under their own peer
        self.traced_folded: Counter[str] = Counter()  # table -> tracepoint events, the same
        self.gave_up = 0
        self.join = PortJoin()
        self.scored_at: float | None = None

    def peer(self, name: str, now: float) -> _Peer:
        found = self.peers.get(name)
        if found is None:
            found = self.peers[name] = _Peer(now)
        return found


def _drained(snapshot: Snapshot) -> tuple[LifecycleStats | None, TracepointStats | None]:
    """The snapshot's values still as their sources drained them (None: absent, or a table)."""
    connections, traced = snapshot.connections, snapshot.tracepoints
    return (
        connections if connections is not None and connections.activity is not None else None,
        traced if traced is not None and traced.pending else None,
    )


class PeerBudget:
    """Keeps every namespace's peers between polls and applies the budget to each poll."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        half_life: float = SCORE_HALF_LIFE_SECONDS,
    ) -> None:
        self._clock = clock
        self._half_life = half_life
        self._spaces: dict[str, _Namespace] = {}

    def apply(
        self, snapshots: Iterable[Snapshot], max_rows: int, idle_seconds: float
    ) -> tuple[Snapshot, ...]:
        """The snapshots, each drained ``connections`` and ``tracepoints`` replaced by the rows
        the budget gives their namespace."""
        snapshots = tuple(snapshots)
        now = self._clock()
        present = {s.netns for s in snapshots}
        self._spaces = {name: space for name, space in self._spaces.items() if name in present}
        drained = [s for s in snapshots if _drained(s) != (None, None)]
        for snapshot in drained:
            self._take_in(snapshot, now)
        granted, others = self._allocate(series_budget(max_rows), idle_seconds, now)
        for netns in {s.netns for s in drained}:
            self._settle(netns, granted, others, now, idle_seconds, candidate_limit(max_rows))
        return tuple(
            self._table(s, max_rows) if _drained(s) != (None, None) else s for s in snapshots
        )

    # -- one poll's counts, by peer ----------------------------------------------------------------

    def _take_in(self, snapshot: Snapshot, now: float) -> None:
        space = self._spaces.setdefault(snapshot.netns, _Namespace())
        if space.scored_at is not None:
            decay = 0.5 ** (max(now - space.scored_at, 0.0) / self._half_life)
            for peer in space.peers.values():
                peer.score *= decay
        space.scored_at = now
        for peer in space.peers.values():
            peer.tracked = False
            peer.pending = None
        space.other_pending = Rows()
        connections, traced = _drained(snapshot)
        if connections is not None:
            for activity in connections.activity or ():
                if activity.peer == PEER_OTHER:  # the listener's own fold (untracked pairs)
                    if activity.delta is not None:
                        space.other_pending.add_conn(activity.delta)
                        space.folded[activity.direction] += sum(activity.delta.closed.values())
                    continue
                peer = space.peer(activity.peer, now)
                peer.tracked = True
                if activity.delta is not None:
                    peer.counts().add_conn(activity.delta)
            failed = traced.failed if traced is not None else None
            for delta in space.join.join(connections.cleared, failed):
                peer = space.peer(delta.peer, now)
                peer.traced = True
                peer.counts().add_conn(delta)
        if traced is not None:
            self._take_traced(space, traced, now)
        for peer in space.peers.values():
            if peer.pending is not None:
                peer.score += peer.pending.weight()

    @staticmethod
    def _take_traced(space: _Namespace, traced: TracepointStats, now: float) -> None:
        for table, count in traced.folded.items():  # folded by the reader (a flood of keys)
            space.traced_folded[table] += count
        for connect in traced.connects:
            if connect.destination == PEER_OTHER:
                space.other_pending.add_connect(connect, PEER_OTHER, PEER_OTHER)
                continue
            peer = space.peer(connect.destination, now)
            peer.traced = True
            process = connect.process
            known = peer.processes()
            if process not in known and len(known) >= PROCESSES_PER_DESTINATION:
                process = PEER_OTHER  # the destination's other processes share one row
                space.traced_folded["connects"] += connect.events()
            peer.counts().add_connect(connect, connect.destination, process)
        for reset in traced.resets:
            if reset.peer == PEER_OTHER:
                space.other_pending.add_reset(reset)
                continue
            peer = space.peer(reset.peer, now)
            peer.traced = True
            peer.counts().add_reset(reset)
        for drop in traced.drops:
            if drop.listener == PEER_OTHER:
                space.other_pending.add_drop(drop)
                continue
            peer = space.peer(drop.listener, now)
            peer.traced = True
            peer.counts().add_drop(drop)

    # -- who gets a place --------------------------------------------------------------------------

    def _allocate(
        self, budget: int, idle_seconds: float, now: float
    ) -> tuple[set[tuple[str, str]], set[str]]:
        """Which (netns, peer) are exported, and which namespaces' ``other`` rows."""
        candidates: list[tuple[int, float, str, str]] = []
        for netns, space in self._spaces.items():
            for name, peer in space.peers.items():
                if peer.pending is None and now - peer.last_active >= idle_seconds:
                    continue  # idle: gives its place up
                if not peer.exported and (peer.score <= 0 or not (peer.tracked or peer.traced)):
                    continue
                weight = peer.score * (HYSTERESIS if peer.exported else 1.0)
                # listeners first, then by score; the names break ties steadily
                candidates.append((0 if peer.listener(name) else 1, -weight, netns, name))
        candidates.sort()
        ungranted: Counter[str] = Counter(netns for _, _, netns, _ in candidates)
        fold_weight: dict[str, float] = {}
        for _, weight, netns, _ in candidates:
            fold_weight[netns] = fold_weight.get(netns, 0.0) - weight
        # What each namespace's "other" rows would cost if every candidate's counts folded
        # into them this poll (a bound: those granted do not).
        reserve: dict[str, int] = {}
        sticky: set[str] = set()  # namespaces that need their other rows whatever is granted
        for netns, space in self._spaces.items():
            folding = [p.pending for p in space.peers.values() if p.pending is not None]
            reserve[netns] = space.other.series_with_folded(PRICES, [space.other_pending, *folding])
            if space.other_pending or now - space.other_active < idle_seconds:
                sticky.add(netns)
        need = {netns for netns, count in ungranted.items() if count} | sticky
        reserved = sum(reserve[netns] for netns in need)
        used = 0
        granted: set[tuple[str, str]] = set()
        for _, _, netns, name in candidates:
            peer = self._spaces[netns].peers[name]
            cost = peer.rows.series(PRICES, peer.pending)
            frees = ungranted[netns] == 1 and netns not in sticky
            if used + cost + reserved - (reserve[netns] if frees else 0) > budget:
                continue
            granted.add((netns, name))
            used += cost
            ungranted[netns] -= 1
            if frees:
                need.discard(netns)
                reserved -= reserve[netns]
        room = budget - used
        others: set[str] = set()
        for netns in sorted(need, key=lambda n: (-fold_weight.get(n, 0.0), n)):
            if reserve[netns] <= room:
                others.add(netns)
                room -= reserve[netns]
        return granted, others

    def _settle(
        self,
        netns: str,
        granted: set[tuple[str, str]],
        others: set[str],
        now: float,
        idle_seconds: float,
        limit: int,
    ) -> None:
        space = self._spaces[netns]
        folding: list[Rows] = []
        for name, peer in list(space.peers.items()):
            was_exported = peer.exported
            peer.exported = (netns, name) in granted
            if peer.pending is not None:
                peer.last_active = now
                if peer.exported:
                    peer.rows.add(peer.pending, now)
                else:
                    folding.append(peer.pending)
                peer.pending = None
            peer.rows.drop_idle(now, idle_seconds)
            if not peer.rows:
                peer.exported = False  # nothing to show (yet, or any more)
            if was_exported and not peer.exported:
                space.gave_up += 1
            if now - peer.last_active >= idle_seconds or not (
                peer.rows or peer.tracked or peer.traced
            ):
                del space.peers[name]
        if folding:
            self._fold(space, folding, now)
        if space.other_pending:
            space.other.add(space.other_pending, now)
            space.other_active = now
        space.other.drop_idle(now, idle_seconds)
        space.other_exported = netns in others
        waiting = [(peer.score, name) for name, peer in space.peers.items() if not peer.rows]
        if len(waiting) > limit:  # the least busy of those without a row are forgotten
            waiting.sort()
            for _, name in waiting[: len(waiting) - limit]:
                del space.peers[name]

    @staticmethod
    def _fold(space: _Namespace, folding: list[Rows], now: float) -> None:
        space.other.add_as_other(folding, now)
        space.other_active = now
        for counts in folding:
            for family, key, events in counts.events():
                (space.folded if family == "connections" else space.traced_folded)[key] += events

    # -- what each namespace exports ---------------------------------------------------------------

    def _table(self, snapshot: Snapshot, max_rows: int) -> Snapshot:
        space = self._spaces[snapshot.netns]
        shown: list[Rows] = [p.rows for p in space.peers.values() if p.exported]
        held: list[Rows] = [p.rows for p in space.peers.values() if not p.exported]
        (shown if space.other_exported else held).append(space.other)
        connections, traced = _drained(snapshot)
        if connections is not None:
            connections = replace(
                connections,
                peers=_conn(shown),
                held=_conn(held),
                folded={direction: space.folded[direction] for direction in DIRECTIONS},
                max_peers=max_rows,
                evicted=space.gave_up,
                activity=None,
                cleared=(),
                unjoined=space.join.unjoined,
            )
        if traced is not None:
            connects, resets, drops = _traced(shown)
            held_connects, held_resets, held_drops = _traced(held)
            traced = replace(
                traced,
                connects=connects,
                resets=resets,
                drops=drops,
                held_connects=held_connects,
                held_resets=held_resets,
                held_drops=held_drops,
                folded={table: space.traced_folded[table] for table in TABLES},
                pending=False,
                failed=(),
            )
        return replace(
            snapshot,
            connections=connections if connections is not None else snapshot.connections,
            tracepoints=traced if traced is not None else snapshot.tracepoints,
        )


def _conn(parts: list[Rows]) -> tuple[PeerStats, ...]:
    rows = [row for rows in parts for row in rows.conn.values()]
    return tuple(sorted(rows, key=lambda row: (row.direction, row.peer)))


def _traced(
    parts: list[Rows],
) -> tuple[tuple[ConnectStats, ...], tuple[ResetStats, ...], tuple[DropStats, ...]]:
    """The tracepoints' rows of these peers, each table in the order of its labels."""
    connects = [row for rows in parts for row in rows.connects.values()]
    resets = [row for rows in parts for row in rows.resets.values()]
    drops = [row for rows in parts for row in rows.drops.values()]
    return (
        tuple(sorted(connects, key=lambda row: (row.destination, row.process))),
        tuple(sorted(resets, key=lambda row: (row.direction, row.peer, row.reason))),
        tuple(sorted(drops, key=lambda row: (row.reason, row.listener))),
    )
