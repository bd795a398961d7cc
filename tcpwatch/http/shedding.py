"""Which connections to close when the connection cap is reached.

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

import heapq
from collections.abc import Iterable, Mapping

from tcpwatch.http.connection import Connection, State

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
