"""What psutil said of an owner that cannot change while the process lives, kept between polls.

A listener's owner is described every poll (owners.py): psutil builds a Process (its stat, for
the start time, and the boot time), reads its status for the user, looks the uid up in the
password database, counts the fds and asks prlimit. Of those, the start time is fixed for the
life of a process; the uid, the limits and the fd count are not (setuid after binding, prlimit
from outside, every accept). So a :class:`KnownOwners` keeps, per pid, the start time and the
user name with the uid it was given for, and a pidfd on the process; a later poll re-reads only
the status' uid, the fd count and the limit, and trusts the kept fields while the pidfd says the
process has not exited. A pid is reused only after its process exited and was reaped, and a
pidfd turns readable when its process exits, so an entry read back after the re-reads, with its
pidfd not readable, was read from the process it describes: a new process under an old pid is
described afresh, never given the old one's start time.

A user renamed in the password database (same uid) shows when the entry is next made afresh, at
most ``MAX_AGE_SECONDS`` later. Without pidfds (Linux before 5.3) nothing is kept.

Owned by the pipeline's FileMemo (one per SnapshotTaker), never by a module.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_AGE_SECONDS = 60.0  # an entry is made afresh at least this often (a renamed user)
STATUS_SIZE = 4096  # the Uid line is in the first 1 KB of /proc/PID/status


@dataclass(frozen=True, slots=True)
class Kept:
    """The fields kept of one owner, and the uid its user name was looked up for."""

    pidfd: int
    started_at: float
    uid: int
    user: str
    made_at: float


def exited(pidfd: int) -> bool:
    """True once the pidfd's process has exited (its pidfd polls readable)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def real_uid(status: bytes) -> int:
    """The real uid (the first of four) of a /proc/PID/status text, as psutil's username().
    Bytes: the Name line is whatever the process set. Raises ValueError without a Uid line."""
    start = status.index(b"\nUid:") + 5
    return int(status[start : status.index(b"\n", start)].split()[0])


class KnownOwners:
    """Kept fields by pid; ``get`` gives an entry only while its process lives."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_age: float = MAX_AGE_SECONDS
    ) -> None:
        self._clock = clock
        self._max_age = max_age
        self._kept: dict[int, Kept] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, pid: int) -> Kept | None:
        """The entry of ``pid``, or None (never kept, too old). An entry whose process exited is
        dropped. The caller re-checks :func:`exited` after reading the process by pid."""
        kept = self._kept.get(pid)
        if kept is None:
            return None
        if self._clock() - kept.made_at >= self._max_age or exited(kept.pidfd):
            self.drop(pid)
            return None
        return kept

    def open(self, pid: int) -> int | None:
        """A pidfd on ``pid``, to be opened before the process is read (None: not available)."""
        try:
            return os.pidfd_open(pid)
        except (OSError, AttributeError):  # gone, or a kernel or Python without pidfds
            return None

    def keep(self, pid: int, pidfd: int, started_at: float, uid: int, user: str) -> None:
        """Keep what was read of ``pid`` after opening ``pidfd``, if its process still lives."""
        if exited(pidfd):
            os.close(pidfd)
            return
        self.drop(pid)
        self._kept[pid] = Kept(pidfd, started_at, uid, user, self._clock())

    def drop(self, pid: int) -> None:
        kept = self._kept.pop(pid, None)
        if kept is not None:
            os.close(kept.pidfd)

    def retain(self, pids: Iterable[int]) -> None:
        """Forget every pid not in ``pids`` (owners no longer wanted)."""
        wanted = set(pids)
        for pid in [pid for pid in self._kept if pid not in wanted]:
            self.drop(pid)

    def close(self) -> None:
        for pid in list(self._kept):
            self.drop(pid)
