"""The host-wide budget of per-peer rows (collect.connection_peers): one bound for every namespace.

Each namespace's destroy listener (sources/lifecycle_peers.py) reports, per tracked (direction,
peer), what closed since the previous poll and a decayed score of how busy the pair is. Here,
once per poll and for all namespaces together, rows go to the busiest pairs; the rest of each
namespace's closes are folded into its ``peer="other"`` row of their direction, and counted.

Order of the rows: listeners of this host first (inbound peers are the listeners connections
arrived on), then outbound peers by score. A pair that holds a row keeps it until a challenger is
``HYSTERESIS`` times busier, so two peers of about the same rate do not trade a row every poll.
``other`` rows are inside the budget: a namespace that folds closes needs one per direction, and
when even those do not fit (more busy namespaces than rows), the least busy namespaces' closes
are only counted in ``folded`` (tcpwatch_connections_folded_total).

Counter semantics (docs/connections.md): every exported value only grows. A row that loses its
place stops being exported (its series go stale) but is remembered; its closes go to ``other``
meanwhile, and when it wins a row again its series go on from the value they had, so rate() and
increase() over a gap read exactly the closes counted under that peer (a restart from zero could
read as less than nothing happened). ``other`` counts only the closes folded into it, never a
row's past. A pair idle (no close) for ``collect.connection_peer_idle`` is forgotten: were it to
come back, its series start from zero, long after any rate() window has lost their old samples.
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
    add_peer_stats,
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

Group = tuple[str, str]  # (netns, direction)
Key = tuple[str, str, str]  # (netns, direction, peer)


class _Row:
    __slots__ = ("exported", "last_active", "score", "stats", "tracked")

    def __init__(self, now: float) -> None:
        self.stats: PeerStats | None = None  # cumulative, as exported (and going on from)
        self.score = 0.0
        self.exported = False
        self.tracked = False  # the listener still tracks the pair
        self.last_active = now  # the latest close counted under it


class _Namespace:
    __slots__ = ("folded", "gave_up", "other", "other_active", "other_exported", "rows")

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], _Row] = {}
        self.other: dict[str, PeerStats] = {}  # direction -> cumulative PEER_OTHER row
        self.other_active: dict[str, float] = {}  # direction -> the latest close folded
        self.other_exported: set[str] = set()
        self.folded: Counter[str] = Counter()
        self.gave_up = 0


class PeerBudget:
    """Keeps every namespace's rows between polls and applies the budget to each poll."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._spaces: dict[str, _Namespace] = {}

    def apply(
        self, snapshots: Iterable[Snapshot], max_rows: int, idle_seconds: float
    ) -> tuple[Snapshot, ...]:
        """The snapshots, each drained ``connections`` replaced by its rows under the budget."""
        snapshots = tuple(snapshots)
        now = self._clock()
        present = {s.netns for s in snapshots}
        self._spaces = {name: space for name, space in self._spaces.items() if name in present}
        drained = {
            s.netns: s.connections
            for s in snapshots
            if s.connections is not None and s.connections.activity is not None
        }
        pending: dict[Key, PeerStats] = {}
        for netns, stats in drained.items():
            pending.update(self._take_in(netns, stats, now))
        granted, other_rows = self._allocate(max_rows, idle_seconds, pending, now)
        for netns in drained:
            self._settle(netns, granted, other_rows, pending, now, idle_seconds)
        return tuple(
            replace(s, connections=self._table(s.netns, s.connections, max_rows))
            if s.netns in drained and s.connections is not None
            else s
            for s in snapshots
        )

    def _take_in(self, netns: str, stats: LifecycleStats, now: float) -> dict[Key, PeerStats]:
        space = self._spaces.setdefault(netns, _Namespace())
        for kept in space.rows.values():
            kept.tracked = False
            kept.score = 0.0
        pending: dict[Key, PeerStats] = {}
        for activity in stats.activity or ():
            key = (netns, activity.direction, activity.peer)
            if activity.peer == PEER_OTHER:
                if activity.delta is not None:
                    pending[key] = add_peer_stats(pending.get(key), activity.delta)
                continue
            row = space.rows.get((activity.direction, activity.peer))
            if row is None:
                row = space.rows[(activity.direction, activity.peer)] = _Row(now)
            row.tracked = True
            row.score = activity.score
            if activity.delta is not None:
                pending[key] = activity.delta
                row.last_active = now
        return pending

    def _allocate(
        self, max_rows: int, idle_seconds: float, pending: dict[Key, PeerStats], now: float
    ) -> tuple[set[Key], set[Group]]:
        """Which (netns, direction, peer) get a row, and which groups an ``other`` row."""
        candidates: list[tuple[int, float, Key]] = []
        for netns, space in self._spaces.items():
            for (direction, peer), row in space.rows.items():
                if now - row.last_active >= idle_seconds:
                    continue  # idle: gives its row up
                if not row.exported and (row.score <= 0 or not row.tracked):
                    continue
                weight = row.score * (HYSTERESIS if row.exported else 1.0)
                # listeners (inbound) first, then by score; the name breaks ties steadily
                candidates.append(
                    (0 if direction == "inbound" else 1, -weight, (netns, direction, peer))
                )
        candidates.sort()
        ungranted: Counter[Group] = Counter((k[0], k[1]) for _, _, k in candidates)
        fold_weight: dict[Group, float] = {}
        for _, weight, key in candidates:
            fold_weight[(key[0], key[1])] = fold_weight.get((key[0], key[1]), 0.0) - weight
        sticky: set[Group] = set()  # groups that need their other row whatever is granted
        for netns, space in self._spaces.items():
            for direction, at in space.other_active.items():
                if now - at < idle_seconds:
                    sticky.add((netns, direction))
        for key in pending:
            if key[2] == PEER_OTHER:
                sticky.add((key[0], key[1]))
        need = {g for g, n in ungranted.items() if n} | sticky
        granted: set[Key] = set()
        for _, _, key in candidates:
            group = (key[0], key[1])
            frees = ungranted[group] == 1 and group not in sticky
            if len(granted) + 1 + len(need) - (1 if frees else 0) > max_rows:
                continue
            granted.add(key)
            ungranted[group] -= 1
            if frees:
                need.discard(group)
        room = max_rows - len(granted)
        ordered = sorted(need, key=lambda g: (-fold_weight.get(g, 0.0), g))
        return granted, set(ordered[: max(room, 0)])

    def _settle(
        self,
        netns: str,
        granted: set[Key],
        other_rows: set[Group],
        pending: dict[Key, PeerStats],
        now: float,
        idle_seconds: float,
    ) -> None:
        space = self._spaces[netns]
        for (direction, peer), row in list(space.rows.items()):
            key = (netns, direction, peer)
            delta = pending.get(key)
            was_exported = row.exported
            row.exported = key in granted
            if row.exported:
                if delta is not None:
                    row.stats = add_peer_stats(row.stats, delta)
                elif row.stats is None:
                    row.exported = False  # nothing to show yet
            else:
                if was_exported:
                    space.gave_up += 1
                if delta is not None:
                    self._fold(space, direction, delta, now)
                if now - row.last_active >= idle_seconds or (not row.tracked and row.stats is None):
                    del space.rows[(direction, peer)]
        for key, delta in pending.items():
            if key[0] == netns and key[2] == PEER_OTHER:
                self._fold(space, key[1], delta, now)
        space.other_exported = {
            direction for direction in space.other if (netns, direction) in other_rows
        }

    @staticmethod
    def _fold(space: _Namespace, direction: str, delta: PeerStats, now: float) -> None:
        space.other[direction] = add_peer_stats(space.other.get(direction), delta, PEER_OTHER)
        space.other_active[direction] = now
        space.folded[direction] += sum(delta.closed.values())

    def _table(self, netns: str, stats: LifecycleStats, max_rows: int) -> LifecycleStats:
        space = self._spaces[netns]
        shown: list[PeerStats] = []
        held: list[PeerStats] = []
        for row in space.rows.values():
            if row.stats is not None:
                (shown if row.exported else held).append(row.stats)
        for direction, other in space.other.items():
            (shown if direction in space.other_exported else held).append(other)
        shown.sort(key=lambda row: (row.direction, row.peer))
        held.sort(key=lambda row: (row.direction, row.peer))
        return replace(
            stats,
            peers=tuple(shown),
            held=tuple(held),
            folded={direction: space.folded[direction] for direction in DIRECTIONS},
            max_peers=max_rows,
            evicted=space.gave_up,
            activity=None,
        )
