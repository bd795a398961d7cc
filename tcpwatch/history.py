"""What a poll remembers of earlier ones: each namespace's previous snapshot and CLOSE_WAIT
first-seen times (for the rules), and which sources keep failing (for the log)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tcpwatch.model import Snapshot

log = logging.getLogger(__name__)

# A source that keeps failing is logged when it starts, then at most this often, then when it
# recovers: enough to notice, never a line per poll.
SOURCE_LOG_REPEAT_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class NetnsHistory:
    """What the rules of one namespace remember from earlier polls."""

    previous: Snapshot | None = None
    close_wait_first_seen: Mapping[int, float] = field(default_factory=dict)


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
