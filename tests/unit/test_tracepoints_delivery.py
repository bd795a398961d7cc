"""Records the kernel counted but never delivered (tracepoints_delivery.py): the events' counts
against the records taken and lost, and the records the reader has taken but not handled yet."""

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


def test_a_record_counted_and_neither_taken_nor_lost_is_undelivered() -> None:
    check = Undelivered()
    same = {"retransmit": 3, "set_state": 10}
    assert check.update(same, {}, same) == {"retransmit": 0, "set_state": 0}
    # One retransmission counted, not in any ring, not lost; two set_state records lost.
    counted = {"retransmit": 4, "set_state": 14}
    lost = {"set_state": 2}
    taken = {"retransmit": 3, "set_state": 12}
    assert check.update(counted, lost, taken) == {"retransmit": 1, "set_state": 0}


def test_records_counted_after_the_count_was_read_never_hide_a_drop() -> None:
    check = Undelivered()
    assert check.update({"set_state": 10}, {}, {"set_state": 8}) == {"set_state": 2}
    # The next drain's take holds records counted after its count was read: the difference is
    # lower then, the drops already seen stay (they only grow).
    assert check.update({"set_state": 20}, {}, {"set_state": 25}) == {"set_state": 2}
    # Lost after the count was read (the lost count is read after the take): never a drop.
    assert check.update({"set_state": 30}, {"set_state": 3}, {"set_state": 25}) == {"set_state": 2}
    assert check.update({"set_state": 40}, {"set_state": 3}, {"set_state": 34}) == {"set_state": 3}


def test_records_held_past_the_horizon_are_taken_before_they_are_handled(tmp_path: Path) -> None:
    chosen = CHOSEN
    tracker = Tracker(TaskResolver(ProcPaths(str(tmp_path))), chosen.states)
    read = RecordReader(chosen, tracker)
    S = chosen.states
    retransmit = sample(F[events.RETRANSMIT], 200, 0, flags=SOFTIRQ, skaddr=0xF0, state=S.syn_sent)
    state = sample(
        F[events.SET_STATE], 210, 0, flags=SOFTIRQ, skaddr=0xF0, oldstate=S.syn_sent,
        newstate=S.established, family=events.AF_INET,
    )  # fmt: skip
    read.handle_spans([bytes(retransmit[4]) + bytes(state[4])], horizon=150)
    # Both wait for the next read (after the horizon), but both were taken from the ring: an
    # event's count that includes them is not short of any record.
    assert read.host(2, 4096).records.get("retransmit", 0) == 0
    taken = read.taken()
    assert (taken["retransmit"], taken["set_state"]) == (1, 1)
    counted = dict.fromkeys(taken, 0) | {"retransmit": 1, "set_state": 1}
    assert set(Undelivered().update(counted, {}, taken).values()) == {0}
    read.handle_spans([], horizon=300)
    assert read.host(2, 4096).records["retransmit"] == 1
    assert read.taken()["retransmit"] == 1  # counted once, when handled
