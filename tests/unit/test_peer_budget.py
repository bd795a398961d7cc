"""The host-wide budget of per-peer rows (issue 19 item 1, issue 21 item 12), on drained stats."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest

from tcpwatch.model import (
    OUTCOMES,
    PEER_OTHER,
    RTT_BUCKETS_SECONDS,
    LifecycleStats,
    PeerActivity,
    PeerStats,
    Snapshot,
)
from tcpwatch.peer_budget import PeerBudget

IDLE = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def delta(direction: str, peer: str, ok: int) -> PeerStats:
    return PeerStats(
        direction,
        peer,
        {outcome: ok if outcome == "ok" else 0 for outcome in OUTCOMES},
        (ok,) + (0,) * len(RTT_BUCKETS_SECONDS),
        ok,
        ok * 1e-4,
        3 * ok,
        0,
        100 * ok,
        50 * ok,
    )


def drained(activity: Iterable[tuple[str, str, float, int]]) -> LifecycleStats:
    """(direction, peer, score, closed since the last drain) per tracked pair."""
    return LifecycleStats(
        peers=(),
        events=0,
        ignored=0,
        malformed=0,
        overruns=0,
        lost=0,
        max_peers=0,
        evicted=0,
        receive_buffer=0,
        activity=tuple(
            PeerActivity(d, p, score, delta(d, p, n) if n else None) for d, p, score, n in activity
        ),
    )


def snapshot(netns: str, stats: LifecycleStats) -> Snapshot:
    return Snapshot(netns, 0.0, None, None, None, None, None, connections=stats)


def ok_by_row(snap: Snapshot) -> dict[tuple[str, str], int]:
    assert snap.connections is not None
    return {(r.direction, r.peer): r.closed["ok"] for r in snap.connections.peers}


def apply(
    budget: PeerBudget, polls: Mapping[str, Iterable[tuple[str, str, float, int]]], rows: int
) -> dict[str, Snapshot]:
    result = budget.apply([snapshot(n, drained(a)) for n, a in polls.items()], rows, IDLE)
    return {snap.netns: snap for snap in result}


def test_rows_go_to_the_busiest_pairs_host_wide_with_other_rows_inside_the_budget() -> None:
    budget = PeerBudget(Clock())
    polls = {
        f"pod{n}": [("outbound", f"10.0.{n}.{k}:80", float(n * 100 + k), 1) for k in range(50)]
        for n in range(8)
    }
    got = apply(budget, polls, rows=20)
    exported = sum(len(s.connections.peers) for s in got.values() if s.connections)
    assert exported <= 20
    # pod7 is the busiest: its peers come first; every namespace still folds into "other"
    assert ("outbound", "10.0.7.49:80") in ok_by_row(got["pod7"])
    for snap in got.values():
        assert snap.connections is not None and snap.connections.activity is None
        rows = ok_by_row(snap)
        total = sum(rows.values()) + sum(r.closed["ok"] for r in snap.connections.held)
        assert total == 50  # every close is under its own row, under other, or held
        assert snap.connections.folded.get("outbound", 0) == 50 - sum(
            n for (_, peer), n in rows.items() if peer != PEER_OTHER
        )
        assert snap.connections.max_peers == 20


def test_a_listener_always_gets_a_row_and_a_new_busy_peer_takes_a_quiet_ones() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    quiet = [("outbound", f"10.0.0.{k}:80", 1.0, 1) for k in range(10)]
    got = apply(budget, {"host": quiet}, rows=6)
    assert len(ok_by_row(got["host"])) == 6  # 5 peers and other
    clock.now += 15
    busy = [("outbound", "10.9.9.9:443", 500.0, 500), ("inbound", "0.0.0.0:8080", 0.5, 1)]
    got = apply(budget, {"host": [*quiet, *busy]}, rows=6)
    rows = ok_by_row(got["host"])
    assert rows[("outbound", "10.9.9.9:443")] == 500
    assert rows[("inbound", "0.0.0.0:8080")] == 1  # the least busy of all, but a listener
    assert len(rows) == 6
    assert got["host"].connections is not None and got["host"].connections.evicted == 2


# always there, never busy: with two rows, "other" is always needed
QUIET = (("outbound", "10.0.0.8:80", 0.5, 1), ("outbound", "10.0.0.9:80", 0.5, 1))


def test_a_row_that_comes_back_goes_on_from_its_value_and_other_never_goes_back() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    seen: dict[tuple[str, str], list[int]] = {}

    def poll(*activity: tuple[str, str, float, int]) -> dict[tuple[str, str], int]:
        clock.now += 15
        rows = ok_by_row(apply(budget, {"host": [*activity, *QUIET]}, rows=2)["host"])
        for key, value in rows.items():
            seen.setdefault(key, []).append(value)
        return rows

    a, b = "10.0.0.1:80", "10.0.0.2:80"
    assert poll(("outbound", a, 10.0, 10)) == {("outbound", a): 10, ("outbound", PEER_OTHER): 2}
    # b becomes far busier: a gives its row up (held at 10), a's closes go to other
    rows = poll(("outbound", a, 12.0, 2), ("outbound", b, 100.0, 100))
    assert rows == {("outbound", b): 100, ("outbound", PEER_OTHER): 2 + 2 + 2}
    # b goes quiet, a busy again: a's series goes on from 10 (not from 0, nor 10 + 2)
    rows = poll(("outbound", a, 300.0, 5), ("outbound", b, 0.1, 0))
    assert rows == {("outbound", a): 15, ("outbound", PEER_OTHER): 8}
    for key, values in seen.items():
        assert values == sorted(values), f"{key} went backwards: {values}"


def test_hysteresis_keeps_a_row_against_a_slightly_busier_peer() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    a, b = "10.0.0.1:80", "10.0.0.2:80"

    def poll(*activity: tuple[str, str, float, int]) -> set[tuple[str, str]]:
        clock.now += 15
        return set(ok_by_row(apply(budget, {"host": [*activity, *QUIET]}, rows=2)["host"]))

    assert ("outbound", a) in poll(("outbound", a, 10.0, 10))
    held = poll(("outbound", a, 10.0, 1), ("outbound", b, 15.0, 15))
    assert ("outbound", a) in held and ("outbound", b) not in held
    taken = poll(("outbound", a, 10.0, 1), ("outbound", b, 25.0, 10))
    assert ("outbound", b) in taken and ("outbound", a) not in taken


def test_more_busy_namespaces_than_rows_still_holds_the_bound_and_counts_the_fold() -> None:
    budget = PeerBudget(Clock())
    polls = {
        f"pod{n:02}": [("outbound", f"10.0.{n}.1:80", float(n), 3), ("inbound", "0.0.0.0:80", 1, 2)]
        for n in range(30)
    }
    got = apply(budget, polls, rows=10)
    exported = sum(len(ok_by_row(s)) for s in got.values())
    assert exported == 10
    for snap in got.values():
        assert snap.connections is not None
        folded = sum(snap.connections.folded.values())
        own = sum(n for (_, peer), n in ok_by_row(snap).items() if peer != PEER_OTHER)
        assert own + folded == 5


def test_idle_pairs_give_their_rows_up_and_are_forgotten() -> None:
    clock = Clock()
    budget = PeerBudget(clock)
    apply(budget, {"host": [("outbound", "10.0.0.1:80", 1.0, 1)]}, rows=4)
    clock.now += IDLE
    got = apply(budget, {"host": [("outbound", "10.0.0.1:80", 0.01, 0)]}, rows=4)
    assert got["host"].connections is not None
    assert got["host"].connections.peers == () and got["host"].connections.held == ()


def test_a_vanished_namespace_is_dropped_and_tables_pass_through() -> None:
    budget = PeerBudget(Clock())
    apply(budget, {"gone": [("outbound", "10.0.0.1:80", 1.0, 1)]}, rows=4)
    table = drained([])
    plain = LifecycleStats((), 0, 0, 0, 0, 0, 0, 0, 0)  # already a table: left as it is
    result = budget.apply([snapshot("new", table), snapshot("built", plain)], 4, IDLE)
    assert result[1].connections is plain
    assert result[0].connections is not None and result[0].connections.peers == ()


@pytest.mark.parametrize("rows", [0, 1])
def test_a_tiny_budget_exports_at_most_that_many_rows(rows: int) -> None:
    budget = PeerBudget(Clock())
    got = apply(budget, {"host": [("outbound", f"10.0.0.{k}:80", 1.0, 1) for k in range(5)]}, rows)
    shown = ok_by_row(got["host"])
    assert len(shown) <= rows
    assert got["host"].connections is not None
    own = sum(n for (_, peer), n in shown.items() if peer != PEER_OTHER)
    assert sum(got["host"].connections.folded.values()) == 5 - own
