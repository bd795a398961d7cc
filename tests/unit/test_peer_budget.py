"""The host-wide budget of per-peer series (issue 19 item 1, issue 21 item 12, issue 17 item 3),
on drained stats of both sources: the destroy listener's and the tracepoints'."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcpwatch.model import PEER_OTHER, LifecycleStats, PeerActivity, PeerStats, Snapshot
from tcpwatch.peer_budget import (
    PROCESSES_PER_DESTINATION,
    SERIES_PER_INBOUND_ROW,
    SERIES_PER_ROW,
    PeerBudget,
    series_budget,
)
from tcpwatch.render.prometheus import render
from tcpwatch.state import ExportState
from tcpwatch.tracepoint_stats import (
    CONNECT_BUCKETS_SECONDS,
    ClearedClose,
    ConnectStats,
    DropStats,
    FailedConnect,
    ResetStats,
    TracepointHost,
    TracepointStats,
)
from tests.unit.snapshots import peer_stats

IDLE = 3600.0
HOST = TracepointHost({}, 0, {}, 0, 2, 4096, (), 0)
PER_PEER = {
    "tcpwatch_connections_closed_total",
    "tcpwatch_connection_rtt_seconds_bucket",
    "tcpwatch_connection_rtt_seconds_sum",
    "tcpwatch_connection_rtt_seconds_count",
    "tcpwatch_connection_segments_sent_total",
    "tcpwatch_connection_segments_retransmitted_total",
    "tcpwatch_connection_bytes_sent_total",
    "tcpwatch_connection_bytes_received_total",
    "tcpwatch_connect_duration_seconds_bucket",
    "tcpwatch_connect_duration_seconds_sum",
    "tcpwatch_connect_duration_seconds_count",
    "tcpwatch_connect_failures_total",
    "tcpwatch_connect_syn_retransmits_total",
    "tcpwatch_peer_resets_sent_total",
    "tcpwatch_peer_resets_received_total",
    "tcpwatch_packet_drops_total",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Closes = tuple[str, str, int] | tuple[str, str, int, int]  # direction, peer, ok[, refused]


def drained(closes: Iterable[Closes], cleared: Sequence[ClearedClose] = ()) -> LifecycleStats:
    """A drain of the destroy listener: per tracked (direction, peer), what closed since."""
    activity = []
    for item in closes:
        direction, peer, ok = item[0], item[1], item[2]
        refused = item[3] if len(item) > 3 else 0
        delta = peer_stats(peer, direction, ok=ok, refused=refused, segments_sent=3 * ok)
        activity.append(PeerActivity(direction, peer, 0.0, delta if ok or refused else None))
    return LifecycleStats(
        (), 0, 0, 0, 0, 0, 0, 0, 0, activity=tuple(activity), cleared=tuple(cleared)
    )


def connect(destination: str, process: str = "app", ok: int = 1, **failures: int) -> ConnectStats:
    buckets = [0] * (len(CONNECT_BUCKETS_SECONDS) + 1)
    buckets[3] = ok
    return ConnectStats(destination, process, tuple(buckets), ok, ok * 1e-4, failures, 0, 0)


def traced(
    connects: Sequence[ConnectStats] = (),
    resets: Sequence[ResetStats] = (),
    drops: Sequence[DropStats] = (),
    failed: Sequence[FailedConnect] = (),
) -> TracepointStats:
    """A drain of the tracepoints' share of a namespace."""
    return TracepointStats(
        tuple(connects), tuple(resets), tuple(drops), HOST, pending=True, failed=tuple(failed)
    )


def snap(
    netns: str,
    connections: LifecycleStats | None = None,
    tracepoints: TracepointStats | None = None,
) -> Snapshot:
    return Snapshot(
        netns, 0.0, None, None, None, None, None, connections=connections, tracepoints=tracepoints
    )


def apply(
    budget: PeerBudget, polls: Mapping[str, Iterable[Closes]], rows: int
) -> dict[str, Snapshot]:
    result = budget.apply([snap(n, drained(a)) for n, a in polls.items()], rows, IDLE)
    return {snapshot.netns: snapshot for snapshot in result}


def ok_by_row(snapshot: Snapshot) -> dict[tuple[str, str], int]:
    assert snapshot.connections is not None
    return {(r.direction, r.peer): r.closed["ok"] for r in snapshot.connections.peers}


def exposition(
    snapshots: Iterable[Snapshot],
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = render(ExportState(tuple(snapshots), (), 1.7e9), include_process=False).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def per_peer_series(snapshots: Iterable[Snapshot]) -> int:
    return sum(1 for name, _ in exposition(snapshots) if name in PER_PEER)


# -- the connection metrics' rows ---------------------------------------------------------------


def test_rows_go_to_the_busiest_peers_host_wide_with_other_rows_inside_the_budget() -> None:
    budget = PeerBudget(Clock())
    polls = {
        f"pod{n}": [("outbound", f"10.0.{n}.{k}:80", n + 1) for k in range(30)] for n in range(8)
    }
    got = apply(budget, polls, rows=20)
    assert per_peer_series(got.values()) <= series_budget(20)
    # pod7 is the busiest: its peers come first, as many as fit beside the 8 namespaces'
    # "other" rows (8 x 26 of 520 series: 12 peers of 26); the quieter pods only fold
    assert len([k for k in ok_by_row(got["pod7"]) if k[1] != PEER_OTHER]) == 12
    for n in range(7):
        assert set(ok_by_row(got[f"pod{n}"])) == {("outbound", PEER_OTHER)}
    for n in range(8):
        connections = got[f"pod{n}"].connections
        assert connections is not None and connections.activity is None
        rows = ok_by_row(got[f"pod{n}"])
        total = sum(rows.values()) + sum(r.closed["ok"] for r in connections.held)
        assert total == 30 * (n + 1)  # every close is under its own row, under other, or held
        own = sum(count for (_, peer), count in rows.items() if peer != PEER_OTHER)
        assert connections.folded["outbound"] == 30 * (n + 1) - own
        assert connections.max_peers == 20


def test_a_listener_always_gets_a_row_and_a_new_busy_peer_takes_a_quiet_ones() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    quiet = [("outbound", f"10.0.0.{k}:80", 1) for k in range(10)]
    got = apply(budget, {"host": quiet}, rows=6)
    assert len(ok_by_row(got["host"])) == 6  # 5 peers and other: 6 rows of 26 series
    clock.now += 15
    busy = [("outbound", "10.9.9.9:443", 500), ("inbound", "0.0.0.0:8080", 1)]
    got = apply(budget, {"host": [*quiet, *busy]}, rows=6)
    rows = ok_by_row(got["host"])
    assert rows[("outbound", "10.9.9.9:443")] == 500
    assert rows[("inbound", "0.0.0.0:8080")] == 1  # the least busy of all, but a listener
    # The room kept for the "other" rows is what every candidate's counts would cost folded
    # (the listener's inbound direction too, 24 series, though it is granted): a bound, so
    # 2 of the 5 quiet peers keep their rows, 3 give them up.
    assert got["host"].connections is not None and got["host"].connections.evicted == 3
    assert len([k for k in rows if k[1].startswith("10.0.0.")]) == 2
    assert per_peer_series(got.values()) <= series_budget(6)


# always there, never busy: with two rows, "other" is always needed
QUIET = (("outbound", "10.0.0.8:80", 1), ("outbound", "10.0.0.9:80", 1))


def test_a_row_that_comes_back_goes_on_from_its_value_and_other_never_goes_back() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    seen: dict[tuple[str, str], list[int]] = {}

    def poll(*closes: Closes) -> dict[tuple[str, str], int]:
        clock.now += 15
        rows = ok_by_row(apply(budget, {"host": [*closes, *QUIET]}, rows=2)["host"])
        for key, value in rows.items():
            seen.setdefault(key, []).append(value)
        return rows

    a, b = "10.0.0.1:80", "10.0.0.2:80"
    assert poll(("outbound", a, 10)) == {("outbound", a): 10, ("outbound", PEER_OTHER): 2}
    # b becomes far busier: a gives its row up (held at 10), a's closes go to other
    rows = poll(("outbound", a, 2), ("outbound", b, 100))
    assert rows == {("outbound", b): 100, ("outbound", PEER_OTHER): 2 + 2 + 2}
    # b goes quiet, a busy again: a's series goes on from 10 (not from 0, nor 10 + 2)
    rows = poll(("outbound", a, 300), ("outbound", b, 0))
    assert rows == {("outbound", a): 310, ("outbound", PEER_OTHER): 8}
    for key, values in seen.items():
        assert values == sorted(values), f"{key} went backwards: {values}"


def test_hysteresis_keeps_a_row_against_a_slightly_busier_peer() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    a, b = "10.0.0.1:80", "10.0.0.2:80"

    def poll(*closes: Closes) -> set[tuple[str, str]]:
        clock.now += 15
        return set(ok_by_row(apply(budget, {"host": [*closes, *QUIET]}, rows=2)["host"]))

    assert ("outbound", a) in poll(("outbound", a, 10))
    held = poll(("outbound", a, 1), ("outbound", b, 15))  # a: 9.4, b: 15 (< 2 x 9.4)
    assert ("outbound", a) in held and ("outbound", b) not in held
    taken = poll(("outbound", a, 1), ("outbound", b, 12))  # a: 8.9, b: 24.6 (> 2 x 8.9)
    assert ("outbound", b) in taken and ("outbound", a) not in taken


def test_more_busy_namespaces_than_room_still_holds_the_bound_and_counts_the_fold() -> None:
    budget = PeerBudget(Clock())
    polls = {
        f"pod{n:02}": [("outbound", f"10.0.{n}.1:80", 3), ("inbound", "0.0.0.0:80", 2)]
        for n in range(30)
    }
    got = apply(budget, polls, rows=10)
    assert per_peer_series(got.values()) <= series_budget(10)
    for snapshot in got.values():
        assert snapshot.connections is not None
        folded = sum(snapshot.connections.folded.values())
        own = sum(n for (_, peer), n in ok_by_row(snapshot).items() if peer != PEER_OTHER)
        assert own + folded == 5


def test_idle_pairs_give_their_rows_up_and_are_forgotten() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    apply(budget, {"host": [("outbound", "10.0.0.1:80", 1)]}, rows=4)
    clock.now += IDLE
    got = apply(budget, {"host": [("outbound", "10.0.0.1:80", 0)]}, rows=4)
    assert got["host"].connections is not None
    assert got["host"].connections.peers == () and got["host"].connections.held == ()


def test_a_vanished_namespace_is_dropped_and_tables_pass_through() -> None:
    budget = PeerBudget(Clock())
    apply(budget, {"gone": [("outbound", "10.0.0.1:80", 1)]}, rows=4)
    table = drained([])
    plain = LifecycleStats((), 0, 0, 0, 0, 0, 0, 0, 0)  # already a table: left as it is
    built = TracepointStats((connect("10.0.0.1:80"),), (), (), HOST)  # the same
    result = budget.apply([snap("new", table), snap("built", plain, built)], 4, IDLE)
    assert result[1].connections is plain and result[1].tracepoints is built
    assert result[0].connections is not None and result[0].connections.peers == ()


@pytest.mark.parametrize("rows", [0, 1])
def test_a_tiny_budget_exports_at_most_that_many_rows(rows: int) -> None:
    budget = PeerBudget(Clock())
    got = apply(budget, {"host": [("outbound", f"10.0.0.{k}:80", 1) for k in range(5)]}, rows)
    shown = ok_by_row(got["host"])
    assert len(shown) <= rows
    assert got["host"].connections is not None
    own = sum(n for (_, peer), n in shown.items() if peer != PEER_OTHER)
    assert sum(got["host"].connections.folded.values()) == 5 - own


# -- one budget for both sources ----------------------------------------------------------------


def test_a_destination_is_granted_held_or_folded_as_one_across_both_sources() -> None:
    budget = PeerBudget(Clock())
    busy, quiet = "10.0.0.1:5432", "10.0.0.2:443"
    connections = drained([("outbound", busy, 50), ("outbound", quiet, 5)])
    tracepoints = traced(
        [
            connect(busy, "app", 49, ECONNREFUSED=1),
            connect(quiet, "curl", 3),
            connect(quiet, "wget", 2),
        ],
        [ResetStats("received", quiet, "", 2)],
    )
    # 104 series: room for the busy destination (26 + 17 + 1 + 1) and the other rows (26 + 19
    # + 1), not for the quiet one besides (26 + 2 x 18 + 1)
    (got,) = budget.apply([snap("host", connections, tracepoints)], 4, IDLE)
    assert got.connections is not None and got.tracepoints is not None
    assert [(r.peer, r.closed["ok"]) for r in got.connections.peers] == [
        (busy, 50),
        (PEER_OTHER, 5),
    ]
    assert [(r.destination, r.process, r.count) for r in got.tracepoints.connects] == [
        (busy, "app", 49),
        (PEER_OTHER, PEER_OTHER, 5),
    ]
    assert [(r.peer, r.count) for r in got.tracepoints.resets] == [(PEER_OTHER, 2)]
    assert got.connections.folded["outbound"] == 5
    assert got.tracepoints.folded == {"connects": 5, "resets": 2, "drops": 0}
    assert per_peer_series([got]) <= series_budget(4)


def test_listener_rows_of_both_sources_come_first() -> None:
    budget = PeerBudget(Clock())
    connections = drained([("outbound", f"10.0.0.{k}:80", 100) for k in range(5)])
    tracepoints = traced(
        [connect(f"10.0.0.{k}:80", ok=100) for k in range(5)],
        drops=[DropStats("TCP_LISTEN_OVERFLOW", "0.0.0.0:8080", 1)],
    )
    (got,) = budget.apply([snap("host", connections, tracepoints)], 2, IDLE)
    assert got.tracepoints is not None
    assert got.tracepoints.drops == (DropStats("TCP_LISTEN_OVERFLOW", "0.0.0.0:8080", 1),)


def test_a_destination_names_its_first_processes_and_the_rest_share_other() -> None:
    budget = PeerBudget(Clock())
    destination = "10.0.0.9:53"
    processes = [f"client{n}" for n in range(PROCESSES_PER_DESTINATION + 2)]
    tracepoints = traced(
        [connect(destination, name, ok=10 - n) for n, name in enumerate(processes)]
    )
    (got,) = budget.apply([snap("host", None, tracepoints)], 136, IDLE)
    assert got.tracepoints is not None
    rows = {(r.destination, r.process): r.count for r in got.tracepoints.connects}
    assert rows == {
        **{(destination, name): 10 - n for n, name in enumerate(processes[:4])},
        (destination, PEER_OTHER): 6 + 5,
    }
    assert got.tracepoints.folded["connects"] == 6 + 5


def test_a_tracepoint_row_held_back_goes_on_from_its_value() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    a, b = "10.0.0.1:80", "10.0.0.2:80"
    history: dict[str, list[int]] = {}

    def poll(*connects: ConnectStats) -> TracepointStats:
        clock.now += 15
        quiet = [connect(f"10.0.1.{k}:80", ok=1) for k in range(2)]
        (got,) = budget.apply([snap("host", None, traced([*connects, *quiet]))], 2, IDLE)
        assert got.tracepoints is not None
        for row in got.tracepoints.connects:
            history.setdefault(row.destination, []).append(row.count)
        return got.tracepoints

    assert next(r.destination for r in poll(connect(a, ok=10)).connects) == a
    lost = poll(connect(a, ok=2), connect(b, ok=100))
    assert a not in {r.destination for r in lost.connects}
    assert [(r.destination, r.count) for r in lost.held_connects if r.destination == a] == [(a, 10)]
    back = poll(connect(a, ok=400))
    assert (a, 410) in {(r.destination, r.count) for r in back.connects}
    for destination, counts in history.items():
        assert counts == sorted(counts), (destination, counts)


def test_whatever_the_traffic_the_exported_series_stay_within_the_budget() -> None:
    """Many namespaces, destinations, listeners, processes, resets and drops over many polls:
    every poll's per-peer series (both sources) within the budget, every counter monotonic,
    every close under its own row (shown or held) or counted as folded."""
    clock = Clock()
    budget = PeerBudget(clock)
    chance = random.Random(19)
    rows = 30
    totals: dict[tuple[str, str], int] = {}
    before: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for _ in range(25):
        clock.now += 15
        snapshots = []
        for n in range(6):
            netns = f"pod{n}"
            closes: list[Closes] = []
            connects, resets, drops = [], [], []
            for _ in range(chance.randrange(40)):
                peer = f"10.{n}.{chance.randrange(60)}.1:{chance.choice((80, 443, 5432))}"
                ok, refused = chance.randrange(1, 30), chance.randrange(3) // 2
                closes.append(("outbound", peer, ok, refused))
                name = chance.choice(("app", "curl", "psql", "nginx", "java", "haproxy"))
                connects.append(
                    connect(peer, name, ok, **({"ECONNREFUSED": refused} if refused else {}))
                )
                if chance.random() < 0.2:
                    resets.append(ResetStats("received", peer, "", chance.randrange(1, 4)))
            for port in chance.sample(range(8000, 8040), 3):
                closes.append(("inbound", f"0.0.0.0:{port}", chance.randrange(1, 9)))
                if chance.random() < 0.3:
                    drops.append(DropStats("TCP_LISTEN_OVERFLOW", f"0.0.0.0:{port}", 2))
            merged: dict[tuple[str, str], Closes] = {}
            for item in closes:  # one delta per tracked pair and drain
                key = (item[0], item[1])
                old = merged.get(key, (item[0], item[1], 0, 0))
                merged[key] = (
                    item[0],
                    item[1],
                    old[2] + item[2],
                    old[3] + (item[3] if len(item) > 3 else 0),
                )  # type: ignore[misc]
            for (direction, _), item in merged.items():
                totals[(netns, direction)] = totals.get((netns, direction), 0) + item[2] + item[3]  # type: ignore[misc]
            unique = {(c.destination, c.process): c for c in connects}
            snapshots.append(
                snap(netns, drained(merged.values()), traced(list(unique.values()), resets, drops))
            )
        result = budget.apply(snapshots, rows, IDLE)
        now = exposition(result)
        assert sum(1 for name, _ in now if name in PER_PEER) <= series_budget(rows)
        for key, value in now.items():
            if key in before and key[0].endswith(("_total", "_bucket", "_sum", "_count")):
                assert value >= before[key], key
        before = now
        for snapshot in result:
            assert snapshot.connections is not None
            for direction in ("inbound", "outbound"):
                own = sum(
                    sum(r.closed.values())
                    for r in (*snapshot.connections.peers, *snapshot.connections.held)
                    if r.direction == direction and r.peer != PEER_OTHER
                )
                folded = snapshot.connections.folded[direction]
                assert own + folded == totals.get((snapshot.netns, direction), 0)


def test_what_a_row_costs_is_what_the_budget_counts() -> None:
    assert (SERIES_PER_ROW, SERIES_PER_INBOUND_ROW) == (26, 24)
    assert series_budget(115) == 2990


def closes_of(snapshot: Snapshot) -> dict[tuple[str, str], PeerStats]:
    assert snapshot.connections is not None
    return {(r.direction, r.peer): r for r in snapshot.connections.peers}
