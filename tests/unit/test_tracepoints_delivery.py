"""Records the kernel counted but never delivered (tracepoints_delivery.py): the events' counts
against the records handled and lost, and which records a read has handled."""

from __future__ import annotations

from pathlib import Path

from tcpwatch.paths import ProcPaths
from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.tracepoints_delivery import Undelivered, per_event
from tcpwatch.sources.tracepoints_records import RecordReader
from tcpwatch.sources.tracepoints_tasks import TaskResolver
from tcpwatch.sources.tracepoints_tracker import Tracker

from .tracepoint_records import SOFTIRQ, fixture_events, sample

CHOSEN = fixture_events()
F = CHOSEN.formats


def test_per_event_sums_the_cpus() -> None:
    reads = [("set_state", 5), ("retransmit", 1), ("set_state", 7), ("retransmit", 0)]
    assert per_event(reads) == {"set_state": 12, "retransmit": 1}


def test_a_record_counted_and_neither_handled_nor_lost_is_undelivered() -> None:
    check = Undelivered()
    same = {"retransmit": 3, "set_state": 10}
    assert check.update(same, {}, same) == {"retransmit": 0, "set_state": 0}
    # One retransmission counted, not in any ring, not lost; two set_state records lost.
    counted = {"retransmit": 4, "set_state": 14}
    lost = {"set_state": 2}
    handled = {"retransmit": 3, "set_state": 12}
    assert check.update(counted, lost, handled) == {"retransmit": 1, "set_state": 0}


def test_records_made_while_the_counts_were_read_never_hide_a_drop() -> None:
    check = Undelivered()
    assert check.update({"set_state": 10}, {}, {"set_state": 8}) == {"set_state": 2}
    # A record counted after its count was read but stamped before the horizon is handled:
    # the difference is lower then, the drops already seen stay (they only grow).
    assert check.update({"set_state": 20}, {}, {"set_state": 19}) == {"set_state": 2}
    # Lost after the count was read (the lost count is read last): never a drop.
    assert check.update({"set_state": 30}, {"set_state": 3}, {"set_state": 25}) == {"set_state": 2}
    assert check.update({"set_state": 40}, {"set_state": 3}, {"set_state": 34}) == {"set_state": 3}


def _reader(tmp_path: Path) -> RecordReader:
    return RecordReader(CHOSEN, Tracker(TaskResolver(ProcPaths(str(tmp_path))), CHOSEN.states))


def test_records_held_past_the_horizon_are_not_handled_yet(tmp_path: Path) -> None:
    """The drain compares the counts read before its horizon with the records older than it:
    set_state records, counted when their span is split, are taken off while held."""
    read = _reader(tmp_path)
    S = CHOSEN.states
    span = b"".join(
        bytes(record[4])
        for record in (
            sample(F[events.RETRANSMIT], 100, 0, flags=SOFTIRQ, skaddr=0xE0, state=S.syn_sent),
            sample(F[events.SET_STATE], 110, 0, flags=SOFTIRQ, skaddr=0xE0,
                   oldstate=S.syn_sent, newstate=S.established, family=events.AF_INET),
            sample(F[events.RETRANSMIT], 200, 0, flags=SOFTIRQ, skaddr=0xF0, state=S.syn_sent),
            sample(F[events.SET_STATE], 210, 0, flags=SOFTIRQ, skaddr=0xF0,
                   oldstate=S.syn_sent, newstate=S.established, family=events.AF_INET),
        )
    )  # fmt: skip
    read.handle_spans([span, b""], horizon=150)
    handled = read.handled()
    assert (handled["retransmit"], handled["set_state"]) == (1, 1)
    # Counted before the horizon: the first two. Nothing is missing.
    counted = dict.fromkeys(handled, 0) | {"retransmit": 1, "set_state": 1}
    assert set(Undelivered().update(counted, {}, handled).values()) == {0}
    read.handle_spans([b"", b""], horizon=300)
    handled = read.handled()
    assert (handled["retransmit"], handled["set_state"]) == (2, 2)
    assert read.host(2, 4096).records == {"retransmit": 2, "set_state": 2} | {
        name: 0 for name in read.host(2, 4096).records if name not in ("retransmit", "set_state")
    }
