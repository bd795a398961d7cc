"""What the owners source read: the owners of interest described with psutil (the
snapshot's ``owner_processes``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OwnerProcess:
    """A socket owner worth describing (a listener's owner, a top CLOSE_WAIT holder), with psutil.

    ``max_fds`` / ``max_fds_hard`` are its RLIMIT_NOFILE soft and hard limits; None when the
    limit is unlimited (RLIM_INFINITY). ``open_fds`` counts every descriptor, sockets or not.
    """

    pid: int
    name: str  # /proc/PID/comm, as process attribution (and `ss -p`) shows it
    user: str  # the user name, or the uid in decimal when it has none
    started_at: float  # unix time
    open_fds: int
    max_fds: int | None
    max_fds_hard: int | None
    listeners: int  # listening sockets it owns, across the polled namespaces
    close_wait: int  # CLOSE_WAIT sockets attributed to it, across the polled namespaces


@dataclass(frozen=True, slots=True)
class OwnerProcesses:
    """The owners of interest of one poll, described (pid -> description)."""

    processes: Mapping[int, OwnerProcess]
    wanted: int  # owners chosen to describe (bounded)
    failed: int = 0  # of those: exited meanwhile or denied to us
    skipped: str = ""  # why none was described (another procfs root), "" otherwise

    def get(self, pid: int) -> OwnerProcess | None:
        return self.processes.get(pid)
