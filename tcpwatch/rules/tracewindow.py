"""What the tracepoints source counted during a rule's window (``Snapshot.tracepoints`` at both
ends): the bottom of ``tcpwatch/rules/`` for every topic module that reads it (C04 and C05 in
tracepoints.py, C01's ports and firewall drops in connects.py, Q02's drop reasons in drops.py).

The counts are cumulative since the reader started; a window is their difference, None without
a window or when the reader restarted in between (a count went backwards). A row the host-wide
budget held back at the window's start (not exported) goes on from its held value; a row absent
then, or whose counts went backwards (forgotten after being idle, and back), counts from zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tcpwatch.rules.base import Window
from tcpwatch.rules.peers import split_peer
from tcpwatch.tracepoint_stats import CONNECT_BUCKETS_SECONDS, ConnectStats, TracepointStats


@dataclass
class Handshakes:
    """One destination's connects during the window, every process together."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS_SECONDS) + 1))
    count: int = 0
    sum_seconds: float = 0.0
    failed: int = 0
    syn_retransmits: int = 0
    retransmitted: int = 0
    processes: dict[str, int] = field(default_factory=dict)  # name -> connects


def both(window: Window) -> tuple[TracepointStats, TracepointStats] | None:
    """(now, at the window's start), or None when they cannot be compared."""
    if window.previous is None:
        return None
    now, before = window.current.tracepoints, window.previous.tracepoints
    if now is None or before is None:
        return None
    if any(now.host.records.get(event, 0) < count for event, count in before.host.records.items()):
        return None  # the reader restarted: its counts began again
    return now, before


def records_missed(window: Window) -> int:
    """Records the kernel did not give the reader during the window, every event's and every
    namespace's (it cannot say whose): lost to a full ring, or counted and never delivered
    (docs/tracepoints.md, "Records the kernel does not deliver"); 0 without a window."""
    pair = both(window)
    if pair is None:
        return 0
    now, before = pair
    lost = now.host.lost - before.host.lost
    undelivered = sum(now.host.undelivered.values()) - sum(before.host.undelivered.values())
    return max(0, lost) + max(0, undelivered)


def handshakes_in(window: Window) -> dict[str, Handshakes] | None:
    """Per destination, the connects of the window (rows that went backwards are left out)."""
    pair = both(window)
    if pair is None:
        return None
    now, before = pair
    earlier = _connects(before)
    found: dict[str, Handshakes] = {}
    for row in now.connects:
        old = _start(row, earlier.get((row.destination, row.process)))
        buckets = [
            count - (old.buckets[i] if old is not None else 0)
            for i, count in enumerate(row.buckets)
        ]
        failed = sum(row.failures.values()) - (sum(old.failures.values()) if old else 0)
        retransmits = row.syn_retransmits - (old.syn_retransmits if old else 0)
        count = sum(buckets)
        if count == 0 and failed == 0:
            continue
        into = found.setdefault(row.destination, Handshakes())
        into.buckets = [a + b for a, b in zip(into.buckets, buckets, strict=True)]
        into.count += count
        into.sum_seconds += row.sum_seconds - (old.sum_seconds if old else 0.0)
        into.failed += failed
        into.syn_retransmits += retransmits
        into.retransmitted += row.retransmitted - (old.retransmitted if old else 0)
        into.processes[row.process] = into.processes.get(row.process, 0) + count + failed
    return found


def _connects(stats: TracepointStats) -> dict[tuple[str, str], ConnectStats]:
    """Every connect row at a window's start, the held ones too."""
    return {(r.destination, r.process): r for r in (*stats.held_connects, *stats.connects)}


def _start(row: ConnectStats, old: ConnectStats | None) -> ConnectStats | None:
    """Where ``row``'s window starts: its value then, or zero (absent, or gone backwards)."""
    if old is None or old.syn_retransmits > row.syn_retransmits or old.count > row.count:
        return None
    if any(b > a for a, b in zip(row.buckets, old.buckets, strict=True)):
        return None
    if any(count > row.failures.get(error, 0) for error, count in old.failures.items()):
        return None
    return old


def quantile(buckets: list[int], q: float) -> float:
    """The q-quantile of a histogram's counts, interpolated inside its bucket as Prometheus'
    histogram_quantile() does; the last finite bound for the +Inf bucket."""
    total = sum(buckets)
    rank = q * total
    seen = 0
    lower = 0.0
    for upper, count in zip(CONNECT_BUCKETS_SECONDS, buckets, strict=False):
        if count and seen + count >= rank:
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return CONNECT_BUCKETS_SECONDS[-1]


def resets_in(window: Window) -> dict[tuple[str, str, str], int] | None:
    pair = both(window)
    if pair is None:
        return None
    now, before = pair
    earlier = {
        (r.direction, r.peer, r.reason): r.count for r in (*before.held_resets, *before.resets)
    }
    found = {}
    for r in now.resets:
        start = earlier.get((r.direction, r.peer, r.reason), 0)
        found[(r.direction, r.peer, r.reason)] = r.count - (start if start <= r.count else 0)
    return found


def drops_in(window: Window) -> dict[tuple[str, str], int] | None:
    """(reason, listener) -> packets dropped in the window."""
    pair = both(window)
    if pair is None:
        return None
    now, before = pair
    earlier = {(d.reason, d.listener): d.count for d in (*before.held_drops, *before.drops)}
    found = {}
    for d in now.drops:
        start = earlier.get((d.reason, d.listener), 0)
        count = d.count - (start if start <= d.count else 0)
        if count > 0:
            found[(d.reason, d.listener)] = count
    return found


def processes(names: dict[str, int]) -> str:
    """The busiest five process names, comma-separated."""
    ranked = sorted(names.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(name for name, _ in ranked[:5]) + (", ..." if len(ranked) > 5 else "")


@dataclass(frozen=True, slots=True)
class FailedAt:
    """Failed connects of the window to one destination, with the port the kernel kept."""

    destination: str
    errors: dict[str, int]
    processes: str

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def failures_at(window: Window, address: str) -> list[FailedAt]:
    """The window's failed connects to any port of ``address``, most first."""
    found: dict[str, FailedAt] = {}
    pair = both(window)
    if pair is None:
        return []
    now, before = pair
    earlier = _connects(before)
    for row in now.connects:
        if split_peer(row.destination)[0] != address:
            continue
        old = _start(row, earlier.get((row.destination, row.process)))
        errors = {
            error: count - (old.failures.get(error, 0) if old is not None else 0)
            for error, count in row.failures.items()
        }
        errors = {error: count for error, count in errors.items() if count > 0}
        if not errors:
            continue
        seen = found.get(row.destination)
        merged = dict(seen.errors) if seen is not None else {}
        for error, count in errors.items():
            merged[error] = merged.get(error, 0) + count
        names = f"{seen.processes}, {row.process}" if seen is not None else row.process
        found[row.destination] = FailedAt(row.destination, merged, names)
    return sorted(found.values(), key=lambda item: (-item.failed, item.destination))
