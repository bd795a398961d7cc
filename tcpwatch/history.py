"""What a poll remembers of earlier ones: each namespace's recent snapshots and CLOSE_WAIT
first-seen times (for the rules), and which sources keep failing (for the log).

Rules about rising counters judge a window of recent polls (``rules.window``), not the last
interval: a listener that overflows on SYN retries every few seconds shows in every poll's
findings instead of every other one. :func:`window_start` picks the snapshot the window starts
at; :func:`remember` keeps just enough snapshots for the next polls' windows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tcpwatch.model import Snapshot

log = logging.getLogger(__name__)

# A source that keeps failing is logged when it starts, then at most this often, then when it
# recovers: enough to notice, never a line per poll.
SOURCE_LOG_REPEAT_SECONDS = 300.0


# At most about this many snapshots are kept per namespace, however long the window is compared
# with the interval: a window start is then within window/MAX_WINDOW_POLLS of the ideal.
MAX_WINDOW_POLLS = 60


@dataclass(frozen=True, slots=True)
class NetnsHistory:
    """What the rules of one namespace remember from earlier polls: its recent snapshots, oldest
    first, the latest last (one namespace: a re-created one starts afresh)."""

    polls: tuple[Snapshot, ...] = ()
    close_wait_first_seen: Mapping[int, float] = field(default_factory=dict)

    @property
    def previous(self) -> Snapshot | None:
        """The latest poll before the one being judged."""
        return self.polls[-1] if self.polls else None


def window_start(polls: Sequence[Snapshot], current: Snapshot, seconds: float) -> Snapshot | None:
    """The snapshot a window of ``seconds`` ending at ``current`` starts at: the oldest of
    ``polls`` (oldest first) at most ``seconds`` old, with half an interval of slack for timer
    jitter; the latest poll when the window is shorter than one interval (never none while
    there is one). Snapshots of another namespace (the name re-used) do not count.
    """
    same = [p for p in polls if p.identity.inode == current.identity.inode]
    if not same:
        return None
    slack = max(current.taken_at - same[-1].taken_at, 0.0) / 2
    for poll in same:
        if current.taken_at - poll.taken_at <= seconds + slack:
            return poll
    return same[-1]


def remember(polls: Sequence[Snapshot], current: Snapshot, seconds: float) -> tuple[Snapshot, ...]:
    """The snapshots to keep after ``current`` was judged: those the next polls' windows may
    start at (no older than ``seconds`` plus the last interval), at least ``seconds /
    MAX_WINDOW_POLLS`` apart, ``current`` always."""
    same = [p for p in polls if p.identity.inode == current.identity.inode]
    interval = current.taken_at - same[-1].taken_at if same else 0.0
    horizon = seconds + max(interval, 0.0)
    spacing = seconds / MAX_WINDOW_POLLS
    kept: list[Snapshot] = []
    for poll in same:
        if current.taken_at - poll.taken_at > horizon:
            continue
        if kept and poll.taken_at - kept[-1].taken_at < spacing:
            continue
        kept.append(poll)
    if kept and current.taken_at - kept[-1].taken_at < spacing and len(kept) > 1:
        kept.pop()  # the newest kept one is too close to current: current takes its place
    kept.append(current)
    return tuple(kept)


def track_close_wait(first_seen: Mapping[int, float], snapshot: Snapshot) -> Mapping[int, float]:
    """CLOSE_WAIT socket inode -> unix time it was first seen, carried over from ``first_seen``.

    Inodes no longer in CLOSE_WAIT are dropped (their socket closed, or an inode number came
    back for a new socket, which then starts afresh). When the socket source failed this poll
    nothing is known, so the old times are kept; when CLOSE_WAIT sockets are not collected at
    all (``collect.attribute_states`` lacks close_wait) there is nothing to track.
    """
    if snapshot.sockets is None:
        return first_seen
    inodes = snapshot.sockets.inodes_by_state.get("close_wait")
    if inodes is None:
        return {}
    return {inode: first_seen.get(inode, snapshot.taken_at) for inode in inodes if inode != 0}


@dataclass(frozen=True, slots=True)
class _Failing:
    since_poll: int  # failed polls in a row
    logged_at: float  # monotonic time of the latest line
    unlogged: int  # failures since that line
    error: str


class SourceFailureLog:
    """Logs failing sources per (netns, source): the first failure, a reminder at most every
    ``repeat_seconds`` while it keeps failing, and one line when it recovers."""

    def __init__(
        self,
        repeat_seconds: float = SOURCE_LOG_REPEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self._repeat = repeat_seconds
        self._clock = clock
        self._log = logger
        self._failing: dict[tuple[str, str], _Failing] = {}
        self._degraded: dict[tuple[str, str], float] = {}  # when it was last logged

    def record(self, snapshots: Iterable[Snapshot]) -> None:
        now = self._clock()
        seen: set[tuple[str, str]] = set()
        for snapshot in snapshots:
            for status in snapshot.sources:
                key = (snapshot.netns, status.name)
                seen.add(key)
                failing = self._failing.get(key)
                if status.ok:
                    if failing is not None:
                        del self._failing[key]
                        self._log.warning(
                            "source %s in netns %s recovered after %d failed poll%s",
                            status.name,
                            snapshot.netns,
                            failing.since_poll,
                            "" if failing.since_poll == 1 else "s",
                        )
                    self._note_degraded(key, status.skipped, now)
                    continue
                error = status.error or "unknown error"
                if failing is None:
                    self._log.warning(
                        "source %s in netns %s failed: %s (its metrics are absent and "
                        "tcpwatch_source_up is 0; repeated at most every %.0f s)",
                        status.name,
                        snapshot.netns,
                        error,
                        self._repeat,
                    )
                    self._failing[key] = _Failing(1, now, 0, error)
                elif now - failing.logged_at >= self._repeat:
                    self._log.warning(
                        "source %s in netns %s still failing (%d polls in a row, %d since the "
                        "last line): %s",
                        status.name,
                        snapshot.netns,
                        failing.since_poll + 1,
                        failing.unlogged + 1,
                        error,
                    )
                    self._failing[key] = _Failing(failing.since_poll + 1, now, 0, error)
                else:
                    self._failing[key] = _Failing(
                        failing.since_poll + 1, failing.logged_at, failing.unlogged + 1, error
                    )
        # A namespace that vanished, or a source that did not run (attribution switched off):
        # forget it rather than report a recovery that never happened.
        for key in [key for key in self._failing if key not in seen]:
            del self._failing[key]
        self._degraded = {key: at for key, at in self._degraded.items() if key in seen}

    def _note_degraded(self, key: tuple[str, str], skipped: tuple[str, ...], now: float) -> None:
        """A source that works but leaves fields out: logged when it starts, then rarely."""
        if not skipped:
            self._degraded.pop(key, None)
            return
        last = self._degraded.get(key)
        if last is not None and now - last < self._repeat:
            return
        self._log.warning(
            "source %s in netns %s left out %d field%s: %s (tcpwatch_source_degraded; "
            "repeated at most every %.0f s)",
            key[1],
            key[0],
            len(skipped),
            "" if len(skipped) == 1 else "s",
            "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else ""),
            self._repeat,
        )
        self._degraded[key] = now

    def failing(self) -> dict[tuple[str, str], str]:
        return {key: value.error for key, value in self._failing.items()}
