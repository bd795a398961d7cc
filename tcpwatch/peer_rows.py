"""Every per-peer row tcpwatch exports about one peer of one namespace, whichever source made it,
and what those rows cost in series: the unit the host-wide budget (peer_budget.py) grants.

A peer is an endpoint as the rows label it: a destination ("10.0.0.5:5432"), a listener
("0.0.0.0:8080"), a local port clients reached, a bare address whose port the kernel cleared, or
"other" (the namespace's folded rows). Its rows:

* the connection metrics' row per direction (lifecycle source, ``peer``);
* the tracepoints' connect rows per connecting process (``destination``, ``process``), resets
  per (direction, reason) (``peer``) and drops per reason (``listener``).

So a destination is granted, held or folded as one, across both sources: a dashboard that shows
its closes also shows its connect times and failures.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from tcpwatch.model import OUTCOMES, PEER_OTHER, RTT_BUCKETS_SECONDS, PeerStats, add_peer_stats
from tcpwatch.scores import FAILURE_WEIGHT
from tcpwatch.tracepoint_stats import (
    CONNECT_BUCKETS_SECONDS,
    ConnectStats,
    DropStats,
    ResetStats,
)

# A connect row: its histogram (the bounds, +Inf, _sum, _count) once a connect completed, its
# SYN retransmissions, and one failure series per errno seen.
CONNECT_HISTOGRAM_SERIES = len(CONNECT_BUCKETS_SECONDS) + 3  # 17
# A listener's closes never time out or get refused (a server socket exists once the handshake
# completed): those two series of an inbound row are exported only once one happened.
INBOUND_RARE = frozenset({"timeout", "refused"})


@dataclass(frozen=True, slots=True)
class Prices:
    """Series of a connection row (peer_budget.py says why: ROW_COUNTERS)."""

    outbound_row: int
    inbound_row: int  # without the rare outcomes


class Rows:
    """The rows of one peer, keyed within it: cumulative (what is exported while the peer holds
    a place, and goes on from after it lost one), or one poll's counts."""

    __slots__ = ("active", "conn", "connects", "drops", "resets")

    def __init__(self) -> None:
        self.conn: dict[str, PeerStats] = {}  # direction ->
        self.connects: dict[str, ConnectStats] = {}  # process ->
        self.resets: dict[tuple[str, str], ResetStats] = {}  # (direction, reason) ->
        self.drops: dict[str, DropStats] = {}  # reason ->
        self.active: dict[tuple[str, ...], float] = {}  # a row -> when it last counted

    def __bool__(self) -> bool:
        return bool(self.conn or self.connects or self.resets or self.drops)

    # -- what it costs and weighs ------------------------------------------------------------

    def series(self, prices: Prices, more: Rows | None = None) -> int:
        """Series these rows export, with ``more``'s counts added (new rows, new errnos ...)."""
        extra = more if more is not None else Rows()
        total = 0
        for direction in self.conn.keys() | extra.conn.keys():
            if direction != "inbound":
                total += prices.outbound_row
                continue
            closes = [r for r in (self.conn.get(direction), extra.conn.get(direction)) if r]
            rare = {o for r in closes for o in INBOUND_RARE if r.closed.get(o, 0)}
            total += prices.inbound_row + len(rare)
        for process in self.connects.keys() | extra.connects.keys():
            found = [r for r in (self.connects.get(process), extra.connects.get(process)) if r]
            completed = any(r.count for r in found)
            errors = {error for r in found for error in r.failures}
            total += (CONNECT_HISTOGRAM_SERIES if completed else 0) + 1 + len(errors)
        total += len(self.resets.keys() | extra.resets.keys())
        return total + len(self.drops.keys() | extra.drops.keys())

    def series_with_folded(self, prices: Prices, folding: Iterable[Rows]) -> int:
        """Series these rows (a namespace's "other" rows) export once ``folding``'s counts are
        added with :meth:`add_as_other`: the keys they would have, without building them (the
        budget asks it of every namespace at every poll)."""
        directions = set(self.conn)
        inbound = self.conn.get("inbound")
        rare = {o for o in INBOUND_RARE if inbound is not None and inbound.closed.get(o, 0)}
        mine = self.connects.get(PEER_OTHER)
        folded = mine is not None
        completed = mine is not None and mine.count > 0
        errors = set(mine.failures) if mine is not None else set()
        resets, drops = set(self.resets), set(self.drops)
        for rows in folding:
            directions.update(rows.conn)
            inbound = rows.conn.get("inbound")
            if inbound is not None:
                rare.update(o for o in INBOUND_RARE if inbound.closed.get(o, 0))
            for connect in rows.connects.values():
                folded = True
                completed = completed or connect.count > 0
                errors.update(connect.failures)
            resets.update(rows.resets)
            drops.update(rows.drops)
        total = sum(
            prices.outbound_row if d != "inbound" else prices.inbound_row + len(rare)
            for d in directions
        )
        for process, connect in self.connects.items():  # named ones: none in "other" today
            if process != PEER_OTHER:
                total += (CONNECT_HISTOGRAM_SERIES if connect.count else 0) + 1
                total += len(connect.failures)
        if folded:
            total += (CONNECT_HISTOGRAM_SERIES if completed else 0) + 1 + len(errors)
        return total + len(resets) + len(drops)

    def weight(self) -> float:
        """How much these counts say a peer is busy: the connections (closed, or connected:
        the same ones seen twice, so the larger), a failure weighing FAILURE_WEIGHT, then
        resets and drops."""
        closes = sum(
            r.closed["ok"] + FAILURE_WEIGHT * (sum(r.closed.values()) - r.closed["ok"])
            for r in self.conn.values()
        )
        connects = sum(
            r.count + FAILURE_WEIGHT * sum(r.failures.values()) for r in self.connects.values()
        )
        resets = sum(r.count for r in self.resets.values())
        return max(closes, connects) + resets + sum(r.count for r in self.drops.values())

    def events(self) -> Iterator[tuple[str, str, int]]:
        """(metric family, direction or table, events) of these counts, for the fold counts."""
        for direction, row in self.conn.items():
            yield "connections", direction, sum(row.closed.values())
        yield "tracepoints", "connects", sum(r.events() for r in self.connects.values())
        yield "tracepoints", "resets", sum(r.count for r in self.resets.values())
        yield "tracepoints", "drops", sum(r.count for r in self.drops.values())

    # -- counting ------------------------------------------------------------------------------

    def add(self, more: Rows, now: float) -> None:
        """Add ``more``'s counts, each to the row of its key (labels as ``more`` has them)."""
        for direction, row in more.conn.items():
            self.add_conn(row)
            self.active[("conn", direction)] = now
        for process, connect in more.connects.items():
            self.add_connect(connect, connect.destination, process)
            self.active[("connect", process)] = now
        for key, reset in more.resets.items():
            self.add_reset(reset)
            self.active[("reset", *key)] = now
        for reason, drop in more.drops.items():
            self.add_drop(drop)
            self.active[("drop", reason)] = now

    def add_as_other(self, parts: Iterable[Rows], now: float) -> None:
        """Add every part's counts under a namespace's "other" rows (every process of a connect
        too): these rows are that namespace's "other". One new row per key however many parts:
        most peers of a busy namespace fold at every poll."""
        conn: dict[str, list[PeerStats]] = {}
        connects: list[ConnectStats] = []
        resets: dict[tuple[str, str], int] = {}
        drops: dict[str, int] = {}
        for part in parts:
            for direction, row in part.conn.items():
                conn.setdefault(direction, []).append(row)
            connects.extend(part.connects.values())
            for key, reset in part.resets.items():
                resets[key] = resets.get(key, 0) + reset.count
            for reason, drop in part.drops.items():
                drops[reason] = drops.get(reason, 0) + drop.count
        for direction, rows in conn.items():
            before = self.conn.get(direction)
            self.conn[direction] = _sum_conn(direction, [*rows, *((before,) if before else ())])
            self.active[("conn", direction)] = now
        if connects:
            before_connect = self.connects.get(PEER_OTHER)
            if before_connect is not None:
                connects.append(before_connect)
            self.connects[PEER_OTHER] = _sum_connects(connects)
            self.active[("connect", PEER_OTHER)] = now
        for (direction, reason), count in resets.items():
            self.add_reset(ResetStats(direction, PEER_OTHER, reason, count))
            self.active[("reset", direction, reason)] = now
        for reason, count in drops.items():
            self.add_drop(DropStats(reason, PEER_OTHER, count))
            self.active[("drop", reason)] = now

    # one poll's counts, as the sources drained them

    def add_conn(self, row: PeerStats) -> None:
        self.conn[row.direction] = add_peer_stats(self.conn.get(row.direction), row)

    def add_connect(self, row: ConnectStats, destination: str, process: str) -> None:
        before = self.connects.get(process)
        self.connects[process] = (
            before.plus(row, destination, process)
            if before is not None
            else replace(row, destination=destination, process=process)
        )

    def add_reset(self, row: ResetStats) -> None:
        before = self.resets.get((row.direction, row.reason))
        count = row.count + (before.count if before else 0)
        self.resets[(row.direction, row.reason)] = ResetStats(
            row.direction, row.peer, row.reason, count
        )

    def add_drop(self, row: DropStats) -> None:
        before = self.drops.get(row.reason)
        count = row.count + (before.count if before else 0)
        self.drops[row.reason] = DropStats(row.reason, row.listener, count)

    def drop_idle(self, now: float, idle_seconds: float) -> None:
        """Rows that counted nothing for ``idle_seconds`` end (their series with them)."""
        for key, at in list(self.active.items()):
            if now - at < idle_seconds:
                continue
            del self.active[key]
            kind, rest = key[0], key[1:]
            if kind == "conn":
                self.conn.pop(rest[0], None)
            elif kind == "connect":
                self.connects.pop(rest[0], None)
            elif kind == "reset":
                self.resets.pop((rest[0], rest[1]), None)
            else:
                self.drops.pop(rest[0], None)


def closes_only(peer: str, outcome: str, count: int) -> PeerStats:
    """``count`` outbound closes of one outcome and nothing else: failed connects whose counters
    the kernel cleared with their port (peer_join.py)."""
    return PeerStats(
        direction="outbound",
        peer=peer,
        closed={o: count if o == outcome else 0 for o in OUTCOMES},
        rtt_buckets=(0,) * (len(RTT_BUCKETS_SECONDS) + 1),
        rtt_count=0,
        rtt_sum_seconds=0.0,
        segments_sent=0,
        segments_retransmitted=0,
        bytes_sent=0,
        bytes_received=0,
    )


def _sum_conn(direction: str, rows: list[PeerStats]) -> PeerStats:
    """Rows of one direction added up, under PEER_OTHER: by add_peer_stats, the one place that
    knows how to add rows (a field added to PeerStats is added here too)."""
    total = replace(rows[0], direction=direction, peer=PEER_OTHER)
    for row in rows[1:]:
        total = add_peer_stats(total, row, PEER_OTHER)
    return total


def _sum_connects(rows: list[ConnectStats]) -> ConnectStats:
    """Connect rows added up, under (PEER_OTHER, PEER_OTHER)."""
    failures: dict[str, int] = {}
    for row in rows:
        for error, count in row.failures.items():
            failures[error] = failures.get(error, 0) + count
    return ConnectStats(
        destination=PEER_OTHER,
        process=PEER_OTHER,
        buckets=tuple(sum(column) for column in zip(*(r.buckets for r in rows), strict=True)),
        count=sum(r.count for r in rows),
        sum_seconds=sum(r.sum_seconds for r in rows),
        failures=dict(sorted(failures.items())),
        syn_retransmits=sum(r.syn_retransmits for r in rows),
        retransmitted=sum(r.retransmitted for r in rows),
    )
