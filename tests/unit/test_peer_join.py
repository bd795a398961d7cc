"""Failed connects whose port the kernel cleared, joined to the tracepoints' failed connects by
(family, local port, address) (issue 17 item 2; tcpwatch/peer_join.py), alone and through the
host-wide budget."""

from __future__ import annotations

import socket

from tcpwatch.model import LifecycleStats, PeerStats, Snapshot
from tcpwatch.peer_budget import PeerBudget
from tcpwatch.peer_join import PortJoin
from tcpwatch.tracepoint_stats import (
    ABANDONED,
    ClearedClose,
    FailedConnect,
    TracepointHost,
    TracepointStats,
)

V4 = socket.AF_INET
HOST = TracepointHost({}, 0, {}, 0, 2, 4096, (), 0)


def refused(
    port: int, destination: str = "127.0.0.1:9999", error: str = "ECONNREFUSED"
) -> FailedConnect:
    address = destination.rsplit(":", 1)[0]
    return FailedConnect(V4, port, address, destination, error)


def cleared(port: int, count: int = 1, address: str = "127.0.0.1") -> ClearedClose:
    return ClearedClose(V4, port, address, count)


def closes(rows: list[PeerStats]) -> dict[tuple[str, str], int]:
    """(peer, outcome) -> closes, of outbound rows that hold nothing but closes."""
    found: dict[tuple[str, str], int] = {}
    for row in rows:
        assert row.direction == "outbound" and row.segments_sent == 0 and row.rtt_count == 0
        for outcome, count in row.closed.items():
            if count:
                found[(row.peer, outcome)] = found.get((row.peer, outcome), 0) + count
    return found


def test_a_cleared_close_gets_its_port_and_outcome_from_the_tracepoints() -> None:
    join = PortJoin()
    got = join.join([cleared(53320), cleared(53321)], [refused(53320), refused(53321)])
    assert closes(got) == {("127.0.0.1:9999", "refused"): 2}
    assert join.unjoined == 0


def test_errors_other_than_a_refusal_and_abandoned_connects_are_timeouts() -> None:
    join = PortJoin()
    failed = [
        refused(40000, "10.0.0.7:443", "ETIMEDOUT"),
        refused(40001, "10.0.0.7:443", "EHOSTUNREACH"),
        refused(40002, "10.0.0.7:443", ABANDONED),
    ]
    got = join.join([cleared(p, address="10.0.0.7") for p in (40000, 40001, 40002)], failed)
    assert closes(got) == {("10.0.0.7:443", "timeout"): 3}


def test_a_close_heard_before_its_record_waits_one_poll_for_it() -> None:
    join = PortJoin()
    assert join.join([cleared(53320)], []) == []  # not counted yet, nor bare
    got = join.join([], [refused(53320)])
    assert closes(got) == {("127.0.0.1:9999", "refused"): 1}
    assert join.unjoined == 0


def test_a_close_no_record_explains_goes_to_the_bare_address_and_is_counted() -> None:
    join = PortJoin()
    assert join.join([cleared(53320, count=2)], []) == []
    got = join.join([], [refused(60000)])  # another port: not this close's record
    assert closes(got) == {("127.0.0.1", "aborted"): 2}
    assert join.unjoined == 2


def test_a_record_is_kept_for_its_poll_and_the_next_only() -> None:
    join = PortJoin()
    assert join.join([], [refused(53320)]) == []
    assert join.join([], []) == []
    assert join.join([cleared(53320)], []) == []  # the record is forgotten: the close waits
    assert closes(join.join([], [])) == {("127.0.0.1", "aborted"): 1}
    assert join.unjoined == 1


def test_one_record_joins_one_close() -> None:
    join = PortJoin()
    got = join.join([cleared(53320, count=3)], [refused(53320), refused(53320)])
    assert closes(got) == {("127.0.0.1:9999", "refused"): 2}
    assert closes(join.join([], [])) == {("127.0.0.1", "aborted"): 1}


def test_without_the_tracepoints_every_cleared_close_is_bare_at_once_and_not_unjoined() -> None:
    join = PortJoin()
    assert join.join([cleared(53320)], []) == []  # waits, the source up
    got = join.join([cleared(53321)], None)  # the source went down: nothing to wait for
    assert closes(got) == {("127.0.0.1", "aborted"): 2}
    assert join.unjoined == 0


def test_a_close_kept_without_its_port_cannot_be_joined() -> None:
    join = PortJoin()
    got = join.join([cleared(0, count=4)], [refused(53320)])  # past the listener's limit
    assert closes(got) == {("127.0.0.1", "aborted"): 4}
    assert join.unjoined == 4


def drained(cleared_closes: tuple[ClearedClose, ...]) -> LifecycleStats:
    return LifecycleStats((), 0, 0, 0, 0, 0, 0, 0, 0, activity=(), cleared=cleared_closes)


def test_the_budget_counts_haproxys_refused_connects_under_the_dead_backend() -> None:
    """What haproxy's dead backend looks like to both sources in one poll: the destroy events
    cleared the port, the tracepoints kept it; the row says 127.0.0.1:9999, refused."""
    budget = PeerBudget()
    ports = range(53320, 53330)
    traced = TracepointStats(
        (), (), (), HOST, pending=True, failed=tuple(refused(p) for p in ports)
    )
    snapshot = Snapshot(
        "host", 0.0, None, None, None, None, None,
        connections=drained(tuple(cleared(p) for p in ports)), tracepoints=traced,
    )  # fmt: skip
    (got,) = budget.apply([snapshot], 136, 3600.0)
    assert got.connections is not None
    assert closes(list(got.connections.peers)) == {("127.0.0.1:9999", "refused"): 10}
    assert got.connections.unjoined == 0
    # the tracepoints down: the same closes under the bare address, as before the join
    again = PeerBudget()
    alone = Snapshot(
        "host", 0.0, None, None, None, None, None,
        connections=drained(tuple(cleared(p) for p in ports)),
    )  # fmt: skip
    (got,) = again.apply([alone], 136, 3600.0)
    assert got.connections is not None
    assert closes(list(got.connections.peers)) == {("127.0.0.1", "aborted"): 10}
