"""What the views show over time: each namespace's state totals over the last polls and the
kernel counters' rates since the previous poll (the live page and `tcpwatch top`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tcpwatch.model import STATES, Snapshot
from tcpwatch.state import Trend

TREND_POLLS = 60  # polls of state totals kept per namespace: a small, fixed cost


def next_trend(earlier: Trend | None, previous: Snapshot | None, snapshot: Snapshot) -> Trend:
    """``earlier`` extended by ``snapshot``; rates are per second since ``previous``.

    A poll whose socket source failed adds no point (nothing is known, and a zero would lie).
    A counter that went down (a reset namespace) has no rate.
    """
    times = earlier.times if earlier is not None else ()
    totals = earlier.totals if earlier is not None else ()
    if snapshot.sockets is not None:
        point = tuple(snapshot.sockets.total(state) for state in STATES)
        times = (*times, snapshot.taken_at)[-TREND_POLLS:]
        totals = (*totals, point)[-TREND_POLLS:]
    return Trend(times, totals, _rates(previous, snapshot))


def _rates(previous: Snapshot | None, snapshot: Snapshot) -> Mapping[str, float]:
    if previous is None or previous.counters is None or snapshot.counters is None:
        return MappingProxyType({})
    seconds = snapshot.taken_at - previous.taken_at
    if seconds <= 0:
        return MappingProxyType({})
    before = previous.counters.values
    if snapshot.counters.values == before:
        # Nothing moved (a quiet namespace): every rate is 0.0, as the general case below
        # computes it, for one comparison of the tables instead of ~300 subtractions.
        return MappingProxyType(dict.fromkeys(snapshot.counters.values, 0.0))
    rates = {
        name: (value - before[name]) / seconds
        for name, value in snapshot.counters.values.items()
        if name in before and value >= before[name]
    }
    return MappingProxyType(rates)
