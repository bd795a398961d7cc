"""The HTTP server's workers: threads that answer complete requests.

A worker gets a connection with one complete request head and what triage or the password
check decided about its credentials, renders the response through the WebApp, writes what the
socket takes at once and hands the connection back to the selector thread with the rest
(tcpwatch.http.connection). It never waits for a client: a slow reader costs the selector thread
a descriptor to watch, not a worker.

Requests wait in one queue, trusted ones (credentials verified before) first; only the others
count against READY_QUEUE, past which they are refused with a quick 503, so a flood never costs
an authenticated scrape its place.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

from tcpwatch import __version__
from tcpwatch.http import limits
from tcpwatch.http.app import Response, WebApp, text_response
from tcpwatch.http.auth import Verdict
from tcpwatch.http.connection import Connection
from tcpwatch.http.wire import ProtocolError, parse_head, response_head

log = logging.getLogger(__name__)

SERVER_VERSION = f"tcpwatch/{__version__}"
# Ranks in the queue: stop first (on shutdown), then trusted requests, then the rest.
_STOP, _TRUSTED, _UNTRUSTED = 0, 1, 2
_Job = tuple[Connection, bytes, Verdict]


class ThrottledLog:
    """An error log line at most once a minute, with how many were left out."""

    def __init__(self) -> None:
        self._last = -3600.0
        self._skipped = 0

    def error(self, message: str, *args: object, exc_info: bool = True) -> None:
        now = time.monotonic()
        if now - self._last < 60:
            self._skipped += 1
            return
        skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" ({skipped} more like it in the last minute)" if skipped else ""
        log.error(message + suffix, *args, exc_info=exc_info)


class Workers:
    """``done(connection, keep)`` takes each connection back (called on the worker's thread)."""

    def __init__(
        self, app: WebApp, done: Callable[[Connection, bool], None], report: Callable[..., None]
    ) -> None:
        self._app = app
        self._done = done
        self._report = report  # a throttled error log
        self._ready: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue()
        self._sequence = 0
        self._untrusted = 0
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def threads(self) -> list[threading.Thread]:
        return [
            threading.Thread(target=self._work, name=f"http-{n}", daemon=True)
            for n in range(limits.WORKERS)
        ]

    def stop(self) -> None:
        self.stopping.set()
        for _ in range(limits.WORKERS):
            self._put(_STOP, None)

    def submit(self, connection: Connection, head: bytes, trusted: bool, verdict: Verdict) -> bool:
        """Queue a request; False when it is untrusted and READY_QUEUE are waiting already."""
        if not trusted:
            with self._lock:
                if self._untrusted >= limits.READY_QUEUE:
                    return False
                self._untrusted += 1
        self._put(_TRUSTED if trusted else _UNTRUSTED, (connection, head, verdict))
        return True

    def _put(self, rank: int, job: _Job | None) -> None:
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
        self._ready.put_nowait((rank, sequence, job))

    def _work(self) -> None:
        while True:
            rank, _, job = self._ready.get()
            if job is None:
                return
            if rank == _UNTRUSTED:
                with self._lock:
                    self._untrusted -= 1
            connection, head, verdict = job
            try:
                keep = self._answer(connection, head, verdict)
            except Exception:  # one broken request must not cost the server a worker
                self._report("error answering a request from %s", connection.address)
                connection.output.clear()
                keep = False
            self._done(connection, keep and not self.stopping.is_set())

    def _answer(self, connection: Connection, head: bytes, verdict: Verdict) -> bool:
        """Answer one request and write what the socket takes now; True to keep the
        connection. Never waits for the client: the rest goes back to the selector thread."""
        if connection.admission.generation != self._app.admission.generation:
            return False  # a reload changed TLS since this connection was let in: no answer
        try:
            request = parse_head(head)
        except ProtocolError as error:
            return self._send(connection, text_response(error.status, str(error)), False, False)
        try:
            response = self._app.respond(
                request.method, request.target, request.headers, connection.address, verdict
            )
        except Exception:  # one broken request must not cost the server its worker
            log.exception("error answering %s %s", request.method, request.target)
            response = text_response(
                HTTPStatus.INTERNAL_SERVER_ERROR, "Internal error (see the log)"
            )
        return self._send(connection, response, request.keep_alive, request.method == "HEAD")

    def _send(self, connection: Connection, response: Response, keep: bool, head: bool) -> bool:
        data = response_head(
            SERVER_VERSION, response.status, response.content_type, response.length,
            response.headers, keep,
        )  # fmt: skip
        connection.queue([data] if head else [data, *response.parts])
        try:
            connection.flush()
        except (OSError, ValueError) as error:
            log.debug("sending to %s failed: %s", connection.address, error)
            connection.output.clear()
            return False
        return keep
