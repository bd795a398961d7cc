"""Records the kernel counted for an event but never delivered: neither written to its ring nor
counted lost.

Each event's count (``read()`` of its descriptor, PERF_FORMAT_LOST beside it) grows by one for
every record that passed its filter, before the kernel stamps and writes it
(kernel/events/core.c: perf_swevent_event adds to the count, then the overflow handler writes
the sample or counts it lost). So, per event, count = records written + lost + records dropped
without a trace. Linux 6.18 drops some that way (docs/tracepoints.md, "Records the kernel does
not deliver"); this counts them.

A drain reads the counts, then takes its horizon, and handles every record older than the
horizon (they are all in the rings HOLD_NS later); the lost counts are read after that. A record
counted before its count was read was stamped before the horizon (the kernel stamps it a few
instructions after counting it), so it is handled, lost, or dropped; a record handled was
stamped, so counted, before the horizon. Hence ``count - lost - handled`` does not exceed the
records dropped so far (a record counted during the microseconds of the reads lowers it by
one), and equals them when no record of that event was made while the counts were being read.
Drops only grow: the highest value seen is kept, per event, so each is exact from the first
drain with no record of its own made during the reads.
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
        self, counted: Mapping[str, int], lost: Mapping[str, int], handled: Mapping[str, int]
    ) -> dict[str, int]:
        """``counted``: the events' counts, read before the horizon; ``lost``: read after the
        records older than it were handled; ``handled``: those records, per event, since the
        reader started. Every event in ``counted`` is in the answer, 0 until one goes missing."""
        dropped = self._dropped
        for event, count in counted.items():
            missing = count - lost.get(event, 0) - handled.get(event, 0)
            if missing > dropped.get(event, 0):
                dropped[event] = missing
            else:
                dropped.setdefault(event, 0)
        return dict(sorted(dropped.items()))
