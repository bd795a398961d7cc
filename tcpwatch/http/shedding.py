"""The connections the selector thread holds, and which to close when the cap is reached.

The cap (tcpwatch.http.limits) keeps descriptors for the sources; what it must not do is let
connections that are merely *held* keep a new client out. So, as nginx reuses its idle
keep-alive connections when `worker_connections` runs out, and unlike a cap that blocks or
refuses new connections (Go's `netutil.LimitListener`, Prometheus' `--web.max-connections`):

1. the client (address, or /64 in IPv6) holding the most connections gives first, so one that
   opens hundreds cannot push out a scraper that holds one;
2. within a client, a fresh connection gets a grace period (GRACE_SECONDS) to send its request:
   it is closed only when every other connection of that client is in its grace too, and then
   the newest goes first (as good as refusing the newcomer: who came first keeps its chance);
3. then idle kept-alive connections go first, the longest idle first (a scraper just
   reconnects, as it does after any idle timeout); then connections waiting for a request or a
   handshake and those a slow reader holds, oldest first; connections waiting for a password
   check go last, the newest first, so the line of checks keeps its order.

A connection a worker is answering is never closed to make room.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import selectors
from collections.abc import Callable, Iterable, Mapping

from tcpwatch.http import limits
from tcpwatch.http.auth import Pending
from tcpwatch.http.connection import Connection, State

log = logging.getLogger(__name__)

GRACE_SECONDS = 1.0
_KIND = {State.HANDSHAKE: 1, State.READING: 1, State.WRITING: 1, State.PARKED: 2}


def _rank(connection: Connection, counts: Mapping[str, int], now: float) -> tuple[float, ...]:
    share = -counts.get(connection.key, 0)
    if connection.fresh and now - connection.opened < GRACE_SECONDS:
        return (share, 1, 0, -connection.opened)
    kind = 0 if connection.idle else _KIND.get(connection.state, 3)
    age = -connection.since if connection.state is State.PARKED else connection.since
    return (share, 0, kind, age)


def victims(
    held: Iterable[Connection], counts: Mapping[str, int], now: float, wanted: int
) -> list[Connection]:
    """Up to ``wanted`` connections to close, best first; beyond the first, only connections
    past their grace (a burst of shedding never takes a newcomer's chance away)."""
    candidates = [c for c in held if c.state is not State.WORKING and not c.closed]
    chosen = heapq.nsmallest(wanted, candidates, key=lambda c: _rank(c, counts, now))
    return [
        connection
        for index, connection in enumerate(chosen)
        if index == 0 or not _rank(connection, counts, now)[1]
    ]


BUSY_SELECT_SECONDS = 0.25
IDLE_SELECT_SECONDS = 5.0
FEW_HELD = 16  # up to this many held connections, the selector sleeps until their first deadline


class HeldConnections:
    """The open connections, from the selector thread's side: those it holds (by descriptor),
    how many the workers hold, how many each client has; the one place a connection ends."""

    def __init__(self, selector: selectors.BaseSelector, cancel: Callable[[Pending], None]):
        self._selector = selector
        self._cancel = cancel  # a parked connection's password check, when it closes
        self.by_fd: dict[int, Connection] = {}
        self.busy = 0  # with the workers
        self.per_client: collections.Counter[str] = collections.Counter()

    def open(self) -> int:
        return len(self.by_fd) + self.busy

    def get(self, fd: int) -> Connection | None:
        return self.by_fd.get(fd)

    def sleep(self, now: float, paused_until: float, busy: bool) -> float:
        """How long the selector may sleep. Busy (checks waiting, a reload to apply) or holding
        many: its 0.25 s tick. Else until the first held deadline or the end of an accept pause,
        at most IDLE_SELECT_SECONDS (anything new wakes it): an idle daemon sleeps."""
        if busy or len(self.by_fd) > FEW_HELD:
            return BUSY_SELECT_SECONDS
        wake_at = min((c.deadline for c in self.by_fd.values()), default=now + IDLE_SELECT_SECONDS)
        if paused_until:
            wake_at = min(wake_at, paused_until)
        return max(0.0, min(wake_at - now, IDLE_SELECT_SECONDS))

    def holds(self, connection: Connection) -> bool:
        return self.by_fd.get(connection.fd) is connection

    def add(self, connection: Connection) -> None:
        """A new connection."""
        self.by_fd[connection.fd] = connection
        self.per_client[connection.key] += 1

    def to_worker(self, connection: Connection) -> None:
        self.watch(connection, 0)
        connection.state = State.WORKING
        del self.by_fd[connection.fd]
        self.busy += 1

    def from_worker(self, connection: Connection) -> None:
        self.busy -= 1
        if not connection.closed:
            self.by_fd[connection.fd] = connection  # its descriptor is still its own

    def watch(self, connection: Connection, events: int) -> None:
        """Watch a held connection for ``events`` (0: not at all)."""
        if connection.events == events:
            return
        fd = connection.fd
        if events == 0:
            self._selector.unregister(fd)
        elif connection.events == 0:
            self._selector.register(fd, events, connection)
        else:
            self._selector.modify(fd, events, connection)
        connection.events = events

    def close(self, connection: Connection, graceful: bool = False) -> None:
        if connection.closed:
            return
        if self.holds(connection):
            del self.by_fd[connection.fd]
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.watch(connection, 0)
        if connection.pending is not None:
            self._cancel(connection.pending)
            connection.pending = None
        self.per_client[connection.key] -= 1
        if self.per_client[connection.key] <= 0:
            del self.per_client[connection.key]
        connection.close(graceful)

    def shed(self, now: float, cap: int) -> bool:
        """Close up to 1/SHED_FRACTION of ``cap`` (see :func:`victims`); False when none can go."""
        wanted = max(1, cap // limits.SHED_FRACTION)
        chosen = victims(self.by_fd.values(), self.per_client, now, wanted)
        for victim in chosen:
            log.debug("shedding the connection from %s (%s)", victim.address, victim.state.value)
            self.close(victim)
        return bool(chosen)
