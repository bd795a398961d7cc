"""What the tracepoints source counts per namespace, and the host-wide budget of its rows.

Each namespace has three tables: connects per (destination, process), resets per (direction,
peer, reason), drops per (reason, listener). A new key gets a row at once, pending. At each
poll, :func:`settle` gives the pending rows of every namespace together the rows left of
``collect.connection_peers`` (as the connection metrics' budget does: one bound for the host,
the busiest first); a pending row that finds none is folded into its table's ``"other"`` row,
and its events are counted in ``folded``. A granted row keeps its place while it is active and
gives it up after ``collect.connection_peer_idle`` without an event (its series end); it is
never taken back for a busier newcomer, so an exported counter never stops and resumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from tcpwatch.model import PEER_OTHER
from tcpwatch.sources.lifecycle_events import Context, make_context
from tcpwatch.tracepoint_stats import (
    CONNECT_BUCKETS_SECONDS,
    ConnectStats,
    DropStats,
    ResetStats,
    TracepointHost,
    TracepointStats,
)

BOUNDS_NS = tuple(round(bound * 1e9) for bound in CONNECT_BUCKETS_SECONDS)
PENDING_LIMIT = 4096  # new keys per table and namespace between two polls; the rest fold
TABLES = ("connects", "resets", "drops")


class Row:
    """A row of a table: exported once granted (or an "other" row), with its activity at the
    last poll and when it last moved, for the budget."""

    __slots__ = ("active_at", "granted", "mark")

    def __init__(self, granted: bool = False) -> None:
        self.granted = granted
        self.mark = 0  # activity at the last poll
        self.active_at = 0.0  # when it last moved (monotonic)

    def activity(self) -> int:
        raise NotImplementedError

    def fold_into(self, other: Row) -> None:
        raise NotImplementedError

    def empty(self) -> Row:
        """A granted row of the same kind, for "other"."""
        return type(self)(granted=True)


class Connects(Row):
    """Connects of one (destination, process): the histogram, failures, retransmissions."""

    __slots__ = ("buckets", "count", "failures", "retransmitted", "sum_ns", "syn_retransmits")

    def __init__(self, granted: bool = False) -> None:
        super().__init__(granted)
        self.buckets = [0] * (len(BOUNDS_NS) + 1)
        self.count = 0
        self.sum_ns = 0
        self.failures: dict[str, int] = {}
        self.syn_retransmits = 0
        self.retransmitted = 0

    def activity(self) -> int:
        return self.count + sum(self.failures.values())

    def fold_into(self, other: Row) -> None:
        assert isinstance(other, Connects)
        other.buckets = [a + b for a, b in zip(other.buckets, self.buckets, strict=True)]
        other.count += self.count
        other.sum_ns += self.sum_ns
        for error, count in self.failures.items():
            other.failures[error] = other.failures.get(error, 0) + count
        other.syn_retransmits += self.syn_retransmits
        other.retransmitted += self.retransmitted

    def frozen(self, destination: str, process: str) -> ConnectStats:
        return ConnectStats(
            destination=destination,
            process=process,
            buckets=tuple(self.buckets),
            count=self.count,
            sum_seconds=self.sum_ns / 1e9,
            failures=dict(sorted(self.failures.items())),
            syn_retransmits=self.syn_retransmits,
            retransmitted=self.retransmitted,
        )


class Count(Row):
    """A count of resets or drops of one key."""

    __slots__ = ("count",)

    def __init__(self, granted: bool = False) -> None:
        super().__init__(granted)
        self.count = 0

    def activity(self) -> int:
        return self.count

    def fold_into(self, other: Row) -> None:
        assert isinstance(other, Count)
        other.count += self.count


Key = tuple[str, ...]
Table = dict[Key, Row]


def _other_key(table: str, key: Key) -> Key:
    if table == "connects":
        return (PEER_OTHER, PEER_OTHER)
    if table == "resets":
        return (key[0], PEER_OTHER, key[2])  # direction and reason kept: both are bounded
    return (key[0], PEER_OTHER)  # drops: the reason kept


def _other_row(table: Table, name: str, key: Key, like: Row) -> Row:
    other_key = _other_key(name, key)
    row = table.get(other_key)
    if row is None:
        row = table[other_key] = like.empty()
    return row


class Tally:
    """One namespace's tables (the hot path adds to them; :func:`settle` bounds them)."""

    __slots__ = ("connects", "context", "drops", "folded", "resets")

    def __init__(self) -> None:
        self.connects: Table = {}
        self.resets: Table = {}
        self.drops: Table = {}
        self.folded: dict[str, int] = dict.fromkeys(TABLES, 0)
        self.context: Context = make_context((), None)

    def connect_row(self, destination: str, process: str) -> Connects:
        key = (destination, process)
        row = self.connects.get(key)
        if row is None:
            row = Connects()
            if len(self.connects) >= PENDING_LIMIT:  # a flood of new keys: they fold at once
                row = _other_row(self.connects, "connects", key, row)
                self.folded["connects"] += 1
            else:
                self.connects[key] = row
        return cast(Connects, row)

    def reset(self, direction: str, peer: str, reason: str) -> None:
        self._count(self.resets, "resets", (direction, peer, reason))

    def drop(self, reason: str, listener: str) -> None:
        self._count(self.drops, "drops", (reason, listener))

    def _count(self, table: Table, name: str, key: Key) -> None:
        row = table.get(key)
        if row is None:
            row = Count()
            if len(table) >= PENDING_LIMIT:
                row = _other_row(table, name, key, row)
                self.folded[name] += 1
            else:
                table[key] = row
        cast(Count, row).count += 1

    def tables(self) -> tuple[tuple[str, Table], ...]:
        return (("connects", self.connects), ("resets", self.resets), ("drops", self.drops))

    def frozen(self, host: TracepointHost) -> TracepointStats:
        """The exported rows (granted and "other"), sorted; pending ones wait for settle()."""
        return TracepointStats(
            connects=tuple(
                cast(Connects, row).frozen(key[0], key[1])
                for key, row in sorted(self.connects.items())
                if row.granted
            ),
            resets=tuple(
                ResetStats(key[0], key[1], key[2], cast(Count, row).count)
                for key, row in sorted(self.resets.items())
                if row.granted
            ),
            drops=tuple(
                DropStats(key[0], key[1], cast(Count, row).count)
                for key, row in sorted(self.drops.items())
                if row.granted
            ),
            host=host,
            folded=dict(self.folded),
        )


def settle(tallies: Iterable[Tally], max_rows: int, idle_seconds: float, now: float) -> int:
    """Apply the host-wide budget: idle rows go, pending rows get the rows left, busiest first
    (then by key, steadily), the rest fold into "other". Returns the rows granted."""
    granted = 0
    pending: list[tuple[int, Key, str, Table, Tally]] = []
    for tally in tallies:
        for name, table in tally.tables():
            for key, row in list(table.items()):
                if PEER_OTHER in key:
                    continue  # "other" rows are exported outside the budget
                activity = row.activity()
                if not row.granted:
                    pending.append((-activity, key, name, table, tally))
                elif activity != row.mark:
                    row.mark, row.active_at = activity, now
                    granted += 1
                elif now - row.active_at >= idle_seconds:
                    del table[key]  # idle: its series end, its place is free
                else:
                    granted += 1
    pending.sort(key=lambda item: (item[0], item[1]))
    for minus_activity, key, name, table, tally in pending:
        row = table[key]
        if granted < max_rows:
            row.granted, row.mark, row.active_at = True, -minus_activity, now
            granted += 1
            continue
        del table[key]
        row.fold_into(_other_row(table, name, key, row))
        tally.folded[name] += -minus_activity
    return granted
