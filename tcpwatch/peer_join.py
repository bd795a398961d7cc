"""Failed connects whose port the kernel cleared, given their port and outcome back by the
tracepoints (issue 17 item 3).

A client that closes a failed connect abortively (haproxy's dead backend: ``SO_LINGER`` 0) goes
through ``tcp_disconnect``, which clears the destination port and the counters before the
socket-destroy event: the lifecycle source hears ``0.0.0.0:53320 -> 127.0.0.1:*`` and keeps it
by what it still says (family, local port 53320, address 127.0.0.1: ``ClearedClose``). The
tracepoints saw the same connect fail before the close, port and errno included
(``FailedConnect``: 127.0.0.1:9999, ECONNREFUSED, local port 53320). Both are one namespace's
share of the same poll, so the pipeline joins them here, before the row budget:

* joined: the closes count under the destination with its port, outcome ``refused`` for
  ECONNREFUSED (the reset a non-abortive client's close would show as ``segs_in``), ``timeout``
  for every other error and for a connect the client abandoned (no answer came);
* the tracepoints' record may be read after the destroy event: the lifecycle source is drained
  before the tracepoints in a poll, and a connect the client gave up on is only known as
  abandoned 100 ms after its close. So a close not joined in its poll waits for the next one;
  a failed connect the tracepoints saw is kept for its poll and the next;
* a close still not joined then counts under the bare address, outcome ``aborted``, as without
  the tracepoints, and in ``unjoined`` (tcpwatch_connections_unjoined_total);
* the tracepoints source off or down in the namespace: every such close counts under the bare
  address at once, as before the join existed (and not in ``unjoined``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import replace

from tcpwatch.model import PeerStats
from tcpwatch.peer_rows import closes_only
from tcpwatch.tracepoint_stats import ClearedClose, FailedConnect

KEEP_POLLS = 2  # a failed connect is kept for the poll that drained it and the next
JOIN_LIMIT = 16384  # failed connects kept per namespace; past it, not kept (their closes: unjoined)
REFUSED = frozenset({"ECONNREFUSED"})

Key = tuple[int, int, str]  # family, local port, address


def outcome_of(error: str) -> str:
    """The outcome a close that kept its counters would have had: refused when a reset came
    back, else timeout (no answer, an ICMP error, or a client that stopped waiting)."""
    return "refused" if error in REFUSED else "timeout"


class PortJoin:
    """One namespace's failed connects (tracepoints) and cleared closes (destroy events)
    waiting for each other. Used by the poll thread only."""

    __slots__ = ("_kept", "_poll", "_seen", "_waiting", "unjoined")

    def __init__(self) -> None:
        self._seen: dict[Key, deque[tuple[str, str, int]]] = {}  # -> (destination, error, poll)
        self._kept = 0
        self._waiting: list[ClearedClose] = []
        self._poll = 0
        self.unjoined = 0  # closes counted under the bare address with the tracepoints up

    def join(
        self, cleared: Iterable[ClearedClose], failed: Sequence[FailedConnect] | None
    ) -> list[PeerStats]:
        """This poll's closes of failed connects whose port was cleared: under the destination
        the tracepoints saw, or under the bare address. ``failed`` None: the tracepoints source
        is not up in this namespace."""
        self._poll += 1
        if failed is None:
            bare = [closes_only(c.address, "aborted", c.count) for c in (*self._waiting, *cleared)]
            self._waiting = []
            self._seen.clear()
            self._kept = 0
            return bare
        self._forget(self._poll - KEEP_POLLS)
        for seen in failed:
            if self._kept >= JOIN_LIMIT:
                break
            key = (seen.family, seen.local_port, seen.address)
            self._seen.setdefault(key, deque()).append((seen.destination, seen.error, self._poll))
            self._kept += 1
        deltas: list[PeerStats] = []
        for close in self._waiting:
            self._give_up(close, self._match(close, deltas), deltas)
        self._waiting = []
        for close in cleared:
            left = self._match(close, deltas)
            if not left:
                continue
            if close.local_port:  # its record may come with the next poll
                self._waiting.append(replace(close, count=left))
            else:  # past the listener's limit: no port to join by
                self._give_up(close, left, deltas)
        return deltas

    def _give_up(self, close: ClearedClose, left: int, into: list[PeerStats]) -> None:
        """The bare address, as without the tracepoints, and counted."""
        if left:
            into.append(closes_only(close.address, "aborted", left))
            self.unjoined += left

    def _match(self, close: ClearedClose, into: list[PeerStats]) -> int:
        """Give ``close``'s connects the failures seen at its key; returns those left."""
        key = (close.family, close.local_port, close.address)
        left = close.count
        seen = self._seen.get(key)
        joined: dict[tuple[str, str], int] = {}
        while left and seen:
            destination, error, _ = seen.popleft()
            self._kept -= 1
            found = (destination, outcome_of(error))
            joined[found] = joined.get(found, 0) + 1
            left -= 1
        if seen is not None and not seen:
            del self._seen[key]
        for (destination, outcome), count in joined.items():
            into.append(closes_only(destination, outcome, count))
        return left

    def _forget(self, before: int) -> None:
        """Failed connects seen at poll ``before`` or earlier: their close never came (it kept
        its port, or the listener lost it)."""
        for key, seen in list(self._seen.items()):
            while seen and seen[0][2] <= before:
                seen.popleft()
                self._kept -= 1
            if not seen:
                del self._seen[key]
