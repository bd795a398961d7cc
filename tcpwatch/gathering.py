"""Long-lived sources between polls: one thread, one selector, every running gatherer.

The poll thread starts a gatherer inside its namespace (``start``; a host-wide one once, in
tcpwatch's own namespace, under the key ``(HOST, name)``), drains it each poll
(``drain``) and retires the ones no longer wanted (``retire``: a namespace vanished, the source was
switched off by a reload); the gathering thread calls ``read_ready`` whenever a gatherer's
descriptor is readable. A gatherer whose ``read_ready`` raises is stopped and reported by the
next drain as a failed source (``tcpwatch_source_up`` 0); the poll after that starts it afresh.

A gatherer with a ``share`` method is given, before it is watched, the thread's shared objects
(a dict each kind of gatherer keeps its own key in): what only the gathering thread uses, one
read at a time, such as the destroy readers' receive slots (lifecycle.DestroyListener.share).

A gatherer with a ``read_delay`` attribute (seconds, > 0) is read in batches: after each
``read_ready`` its descriptor is not watched until the delay has passed, so a busy stream wakes
the thread once per delay instead of once per message. The thread keeps feeding the others.

Python's cyclic garbage collector waits while a gatherer reads (``collector_paused``): a read
makes thousands of short-lived tuples (a batch of destroy messages, a run of tracepoint records)
that reference counting frees at its end, and a collection triggered in the middle of it scanned
them all: under 35,000 destroy events a second, about 0.3 us an event, a tenth of the daemon's
CPU (docs/performance.md, "The collector waits while a gatherer reads"). Collections are put
off, not skipped: the first allocation after the read runs whatever is due, over what survived.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from tcpwatch.errors import describe_error
from tcpwatch.model import Snapshot, SourceStatus
from tcpwatch.sources.base import (
    Gatherer,
    HostGatherer,
    HostLongLivedSource,
    LongLivedSource,
    Partial,
    SourceContext,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, and back as it was (see the module
    docstring); process-wide, so other threads' allocations wait too, for the length of a read."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# (namespace inode, source name): a namespace re-created under the same name is another key.
GathererKey = tuple[int, str]
HOST = 0  # the inode of a host-wide gatherer's key: no namespace has it
STOP_JOIN_SECONDS = 1.0


@dataclass(slots=True)
class _Running:
    gatherer: Gatherer | HostGatherer
    failure: str | None = None  # set by the gathering thread when read_ready raised
    resume_at: float | None = None  # monotonic time to watch it again (read_delay), or None


class Gathering:
    """The running gatherers and the thread that feeds them. Only the poll thread calls its
    methods; the gathering thread only reads descriptors and marks failures."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self._timer = timer
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._running: dict[GathererKey, _Running] = {}
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shared: dict[str, object] = {}  # the gathering thread's, handed out by ensure

    @property
    def keys(self) -> frozenset[GathererKey]:
        with self._lock:
            return frozenset(self._running)

    def ensure(
        self,
        key: GathererKey,
        source: LongLivedSource | HostLongLivedSource,
        context: SourceContext,
    ) -> None:
        """Start ``source`` for ``key`` unless it runs; call from inside the namespace.

        Raises what ``start`` raised: the caller reports it as the source's failure.
        """
        with self._lock:
            if key in self._running:
                return
        gatherer: Gatherer | HostGatherer = source.start(context)
        share = getattr(gatherer, "share", None)
        if share is not None:
            share(self._shared)
        with self._lock:
            self._running[key] = _Running(gatherer)
            self._selector.register(gatherer.fileno(), selectors.EVENT_READ, key)
        self._start_thread()
        self._wake()

    def drain(
        self, key: GathererKey, name: str, so_far: Snapshot
    ) -> tuple[object | None, SourceStatus]:
        """What the gatherer of ``key`` gathered, with its status. A failed gatherer is closed
        here and reported; the next ``ensure`` starts it again."""
        return self._drain(key, name, lambda gatherer: cast(Gatherer, gatherer).drain(so_far))

    def drain_host(
        self, key: GathererKey, name: str, so_far: Sequence[Snapshot]
    ) -> tuple[Mapping[int, object] | None, SourceStatus]:
        """As :meth:`drain`, for a host-wide gatherer: a value per namespace inode."""
        value, status = self._drain(
            key, name, lambda gatherer: cast(HostGatherer, gatherer).drain(so_far)
        )
        return cast(Mapping[int, object] | None, value), status

    def _drain(
        self, key: GathererKey, name: str, call: Callable[[Any], object]
    ) -> tuple[object | None, SourceStatus]:
        started = self._timer()
        with self._lock:
            running = self._running.get(key)
            failure = running.failure if running is not None else "not running"
        if running is None or failure is not None:
            if running is not None:
                self._close(key)
            return None, SourceStatus(name, False, self._timer() - started, failure)
        try:
            value = call(running.gatherer)
        except Exception as error:  # a source must never take the poll down with it
            log.debug("draining %s failed", name, exc_info=True)
            self._close(key)
            return None, SourceStatus(name, False, self._timer() - started, describe_error(error))
        if isinstance(value, Partial):  # worked, but left fields out: degraded
            return value.value, SourceStatus(
                name, True, self._timer() - started, skipped=value.skipped
            )
        return value, SourceStatus(name, True, self._timer() - started)

    def retire(self, keep: Collection[GathererKey]) -> None:
        """Stop every gatherer not in ``keep``."""
        for key in self.keys - set(keep):
            self._close(key)

    def close(self) -> None:
        """Stop the thread and every gatherer."""
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=STOP_JOIN_SECONDS)
        self.retire(())
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    # -- internals ----------------------------------------------------------------------------

    def _close(self, key: GathererKey) -> None:
        with self._lock:
            running = self._running.pop(key, None)
            if running is None:
                return
            # Already unregistered after a failure or for its read delay, or its descriptor is gone.
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(running.gatherer.fileno())
        try:
            running.gatherer.close()
        except Exception:  # closing must not fail the poll either
            log.debug("closing a gatherer failed", exc_info=True)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self._wake_write, b"x")

    def _start_thread(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._loop, name="gather", daemon=True)
            self._thread = thread
            thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Asleep until a descriptor is readable, a paused one is due, or the wake pipe
            # (ensure, close): an idle daemon's gathering thread wakes for nothing else.
            due = self._resume_paused()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            for selected, _ in self._selector.select(timeout=timeout):
                if selected.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                    continue
                self._feed(selected.data)

    def _feed(self, key: GathererKey) -> None:
        with self._lock:
            running = self._running.get(key)
        if running is None or running.failure is not None:
            return
        try:
            with collector_paused():
                running.gatherer.read_ready()
        except Exception as error:
            log.debug("gatherer %s failed", key, exc_info=True)
            with self._lock:
                running.failure = describe_error(error)
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(running.gatherer.fileno())
            return
        delay = getattr(running.gatherer, "read_delay", 0.0)
        if delay > 0:
            with self._lock:
                if self._running.get(key) is running:  # not closed meanwhile
                    running.resume_at = time.monotonic() + delay
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._selector.unregister(running.gatherer.fileno())

    def _resume_paused(self) -> float | None:
        """Watch again every gatherer whose read delay has passed; when the next one is due
        (None: none is paused)."""
        now = time.monotonic()
        due: float | None = None
        with self._lock:
            for key, running in self._running.items():
                if running.resume_at is None or running.failure is not None:
                    continue
                if running.resume_at > now:
                    due = running.resume_at if due is None else min(due, running.resume_at)
                    continue
                running.resume_at = None
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.register(running.gatherer.fileno(), selectors.EVENT_READ, key)
        return due
