"""The line of password checks waiting for bcrypt, and the one thread that runs them.

A request whose credentials need bcrypt waits here without holding an HTTP worker: the server
parks its connection and the check's callback hands it to a worker once the answer is known. So
what a flood of wrong passwords can take is bounded twice: one bcrypt thread (at most one core,
as exporter-toolkit's one-check-at-a-time mutex), and one waiting check per connection, which the
connection cap bounds. A flooder's next guess waits for its last answer, so parking them also
slows the flood itself down to the rate of checks.

Who goes first:

* checks for a (client address, user) that has failure budget left (*clean*) go before any
  other, fewest recent failures first, then in arrival order: a scraper's first check waits
  behind what arrived before it, never behind what arrives after;
* checks for a (client address, user) out of budget (*throttled*) wait in a lane per user
  (unknown users share one), in arrival order, taken only when no clean check waits and at most
  one per lane every THROTTLED_INTERVAL_SECONDS. A correct password sent from the address a
  flood comes from is therefore still checked, after the requests that were waiting before it:
  its wait is bounded by the connections waiting ahead of it, not by how fast the flood asks.

A check that waits longer than CHECK_WAIT_SECONDS ends unchecked (``result`` None); a check
whose client hung up is cancelled (its place goes to the next).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import bcrypt

CHECK_WAIT_SECONDS = 10.0  # Prometheus' default scrape timeout: an answer after it helps nobody
THROTTLED_INTERVAL_SECONDS = 0.05  # a throttled lane: at most 20 checks a second, whatever cost
MAX_WAITING = 1024  # beyond the connection cap already; a last bound should anything leak


class Check:
    """One password check; ``result`` is None until it is done, and stays None when it ends
    unchecked (waited too long, cancelled, or the line was full)."""

    __slots__ = (
        "callback", "deadline", "done", "hashed", "lane", "password", "priority", "result",
        "seq", "throttled",
    )  # fmt: skip

    def __init__(
        self,
        password: bytes,
        hashed: bytes,
        lane: str,
        throttled: bool,
        priority: float,
        seq: int,
        deadline: float,
        callback: Callable[[Check], None] | None,
    ) -> None:
        self.password = password
        self.hashed = hashed
        self.lane = lane
        self.throttled = throttled
        self.priority = priority
        self.seq = seq
        self.deadline = deadline
        self.callback = callback
        self.result: bool | None = None
        self.done = threading.Event()

    def _finish(self, result: bool | None) -> None:
        self.result = result
        try:
            if self.callback is not None:
                self.callback(self)
        finally:
            self.done.set()  # after the callback, so a waiter sees what it concluded


class CheckLine:
    """The waiting checks and the bcrypt thread (started when work arrives, ended when the line
    is empty, so a line nobody uses holds no thread)."""

    def __init__(
        self,
        wait: float = CHECK_WAIT_SECONDS,
        throttled_interval: float = THROTTLED_INTERVAL_SECONDS,
        capacity: int = MAX_WAITING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wait = wait
        self._interval = throttled_interval
        self._capacity = capacity
        self._clock = clock
        self._clean: list[Check] = []
        self._lanes: dict[str, deque[Check]] = {}
        self._last_taken: dict[str, float] = {}  # lane -> when its last throttled check began
        self._seq = 0
        self._running = False
        self._condition = threading.Condition()

    def waiting(self) -> int:
        with self._condition:
            return len(self._clean) + sum(len(lane) for lane in self._lanes.values())

    def submit(
        self,
        password: bytes,
        hashed: bytes,
        lane: str,
        throttled: bool,
        priority: float = 0.0,
        callback: Callable[[Check], None] | None = None,
    ) -> Check:
        """Queue a check; ``callback(check)`` runs once it is done (on the bcrypt thread, or
        here when the line is full), and must not block."""
        with self._condition:
            self._seq += 1
            check = Check(
                password, hashed, lane, throttled, priority, self._seq,
                self._clock() + self.wait, callback,
            )  # fmt: skip
            full = len(self._clean) + sum(len(q) for q in self._lanes.values()) >= self._capacity
            if not full:
                if throttled:
                    self._lanes.setdefault(lane, deque()).append(check)
                else:
                    self._clean.append(check)
                if not self._running:
                    self._running = True
                    threading.Thread(target=self._work, name="bcrypt", daemon=True).start()
                self._condition.notify()
        if full:
            check._finish(None)
        self.expire()
        return check

    def expire(self) -> None:
        """End the checks that waited past their deadline. The bcrypt thread does this before
        each check; callers do it too, as one slow check must not hold the others' answers."""
        expired: list[Check] = []
        with self._condition:
            self._expire(expired, self._clock())
        for check in expired:
            check._finish(None)

    def cancel(self, check: Check) -> None:
        """The client went away: drop its check if it still waits (no callback)."""
        with self._condition:
            if check in self._clean:
                self._clean.remove(check)
            else:
                lane = self._lanes.get(check.lane)
                if lane is not None and check in lane:
                    lane.remove(check)

    def _work(self) -> None:
        while True:
            expired: list[Check] = []
            with self._condition:
                job = self._next(expired)
                while job is None and not expired and self._has_work():
                    self._condition.wait(self._pause())
                    job = self._next(expired)
                if job is None and not expired and not self._has_work():
                    self._running = False
                    return
            for check in expired:
                check._finish(None)
            if job is not None:
                try:
                    ok = bcrypt.checkpw(job.password, job.hashed)
                except ValueError:  # longer than bcrypt's 72 bytes: no stored hash can match
                    ok = False
                job._finish(ok)

    def _has_work(self) -> bool:
        return bool(self._clean) or any(self._lanes.values())

    def _expire(self, expired: list[Check], now: float) -> None:
        """Move the checks past their deadline to ``expired`` (under the lock)."""
        for check in [c for c in self._clean if c.deadline <= now]:
            self._clean.remove(check)
            expired.append(check)
        for lane in self._lanes.values():
            while lane and lane[0].deadline <= now:
                expired.append(lane.popleft())

    def _next(self, expired: list[Check]) -> Check | None:
        """The next check to run (under the lock); expired ones are moved to ``expired``."""
        now = self._clock()
        self._expire(expired, now)
        if self._clean:
            job = min(self._clean, key=lambda c: (c.priority, c.seq))
            self._clean.remove(job)
            return job
        ready = [
            lane
            for name, lane in self._lanes.items()
            if lane and now - self._last_taken.get(name, -1e9) >= self._interval
        ]
        if not ready:
            return None
        # The lane whose head has waited longest: lanes take turns, each in arrival order.
        job = min(ready, key=lambda lane: lane[0].seq).popleft()
        self._last_taken[job.lane] = now
        for name in [name for name, lane in self._lanes.items() if not lane]:
            del self._lanes[name]
        return job

    def _pause(self) -> float:
        """How long to sleep when only rate-held lanes wait (under the lock)."""
        now = self._clock()
        soonest = [
            self._last_taken.get(name, now) + self._interval - now
            for name, lane in self._lanes.items()
            if lane
        ]
        deadlines = [lane[0].deadline - now for lane in self._lanes.values() if lane]
        return max(0.001, min([*soonest, *deadlines, 1.0]))
