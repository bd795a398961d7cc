"""Records the kernel counted for an event but never delivered: neither written to its ring nor
counted lost.

Each event's count (``read()`` of its descriptor, PERF_FORMAT_LOST beside it) grows by one for
every record that passed its filter, before the kernel tries to write it
(kernel/events/core.c: perf_swevent_event adds to the count, then the overflow handler writes
the sample or counts it lost). So, per event, count = records taken + lost + records dropped
without a trace. Linux 6.18 drops some that way (docs/tracepoints.md, "Records the kernel does
not deliver"); this counts them, exactly once the rings are read past them.

The count is read before the rings are taken, and the lost count after: a record counted before
the first read is in its ring (or counted lost) by the take, at least HOLD_NS later (records are
written with preemption off), while records counted after it only raise the records taken. So
``count - lost - taken`` never exceeds the records dropped so far, and equals them when no record
of that event passed the filter between the two reads; drops only grow, so the highest value
seen is kept: per event, so a rare event (a SYN retransmission) is exact at nearly every drain
even when a busy one (set_state) is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def per_event(reads: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The sum over CPUs of each event's value: ``reads`` is (event, value) per descriptor."""
    sums: dict[str, int] = {}
    for event, value in reads:
        sums[event] = sums.get(event, 0) + value
    return sums


class Undelivered:
    """Per event, the records counted and never delivered, kept from drain to drain."""

    def __init__(self) -> None:
        self._dropped: dict[str, int] = {}

    def update(
        self, counted: Mapping[str, int], lost: Mapping[str, int], taken: Mapping[str, int]
    ) -> dict[str, int]:
        """``counted``: the events' counts read before the take; ``lost`` read after it;
        ``taken``: records of each event taken from the rings since the reader started. Every
        event in ``counted`` is in the answer, 0 until a record goes missing."""
        dropped = self._dropped
        for event, count in counted.items():
            missing = count - lost.get(event, 0) - taken.get(event, 0)
            if missing > dropped.get(event, 0):
                dropped[event] = missing
            else:
                dropped.setdefault(event, 0)
        return dict(sorted(dropped.items()))
