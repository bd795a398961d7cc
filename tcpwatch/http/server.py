"""The listening socket of `tcpwatch serve`: connections, request threads, TLS, limits.

One selector thread accepts connections and reads every request head without blocking; a small
pool of worker threads answers complete requests through the :class:`~tcpwatch.http.app.WebApp`
and hands kept-alive connections back (see tcpwatch.http.connection). That shape is what holds a
flood of slow clients: a client that drips its headers or never speaks costs a descriptor, not a
thread, and is dropped when its whole-head deadline passes. Open connections are capped well
below the descriptor limit (tcpwatch.http.limits); when the cap is reached, or accept() runs out
of descriptors, the connection that has waited longest without ever getting a 2xx answer is
closed first, so a scraper's fresh connection always gets in and the accept loop never spins.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from http import HTTPStatus
from typing import Any

from tcpwatch import __version__
from tcpwatch.http import limits
from tcpwatch.http.app import Response, WebApp, text_response
from tcpwatch.http.connection import (
    Connection,
    ProtocolError,
    answer_and_close,
    parse_head,
    response_bytes,
)
from tcpwatch.http.limits import DescriptorBudget, descriptor_budget
from tcpwatch.http.listen import ListenAddress, ListenError
from tcpwatch.http.webconfig import client_sans

log = logging.getLogger(__name__)

SERVER_VERSION = f"tcpwatch/{__version__}"
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_PAUSE_SECONDS = 0.5  # when nothing can be shed to free a descriptor
_SWEEP_SECONDS = 0.1
_LISTENER = "listener"
_WAKE = "wake"
# Ranks in the workers' queue: stop first (on shutdown), then trusted requests, then the rest.
_STOP, _TRUSTED, _UNTRUSTED = 0, 1, 2


class WebServer:
    """The listening socket, its selector thread and its workers."""

    def __init__(
        self, listen: ListenAddress, app: WebApp, budget: DescriptorBudget | None = None
    ) -> None:
        self._budget = budget or descriptor_budget()
        self._app = app
        self._listener = _bind(listen)
        self._listener.setblocking(False)
        host, port = self._listener.getsockname()[:2]
        self.address = ListenAddress(str(host), int(port))
        app.listening_on = str(self.address)
        log.info("%s", limits.describe(self._budget))
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._returned: queue.SimpleQueue[tuple[Connection, bool]] = queue.SimpleQueue()
        # Requests for the workers, trusted ones (credentials verified before) first; only the
        # others count against READY_QUEUE, so a flood never costs an authenticated scrape.
        self._ready: queue.PriorityQueue[tuple[int, int, tuple[Connection, bytes] | None]] = (
            queue.PriorityQueue()
        )
        self._sequence = itertools.count()
        self._untrusted_queued = 0  # selector thread adds, workers subtract under the lock
        self._queued_lock = threading.Lock()
        self._waiting: dict[int, Connection] = {}  # by descriptor: owned by the selector thread
        self._busy = 0  # connections with the workers (selector thread only)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_paused_until = 0.0
        self._last_sweep = 0.0
        self._last_warning = -3600.0

    @property
    def max_connections(self) -> int:
        return self._budget.max_connections

    @property
    def url(self) -> str:
        scheme = "https" if self._app.web_config.ssl_context is not None else "http"
        host = self.address.host
        if host in ("::", "0.0.0.0"):
            host = "localhost"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.address.port}/metrics"

    def open_connections(self) -> int:
        return len(self._waiting) + self._busy

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, name="http", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"http-{n}", daemon=True)
            for n in range(limits.WORKERS)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        for _ in range(limits.WORKERS):
            self._ready.put_nowait((_STOP, next(self._sequence), None))
        if self._threads:
            self._threads[0].join(timeout=1.0)
        self._listener.close()
        self._wake_write.close()

    # -- the selector thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_read, selectors.EVENT_READ, _WAKE)
        try:
            while not self._stopping.is_set():
                self._loop_once()
        finally:
            for connection in list(self._waiting.values()):
                self._close(connection)
            self._selector.close()
            self._wake_read.close()

    def _loop_once(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        for key, _ in self._selector.select(0.25):
            if key.data is _LISTENER:
                self._accept()
            elif key.data is _WAKE:
                self._take_returned()
            else:
                connection = self._waiting.get(key.fd)
                if connection is key.data and connection is not None:  # not closed this batch
                    self._readable(connection)
        now = time.monotonic()
        if now - self._last_sweep >= _SWEEP_SECONDS:
            self._last_sweep = now
            for connection in [c for c in self._waiting.values() if c.deadline <= now]:
                self._close(connection)  # idle too long, or its head did not arrive in time

    def _accept(self) -> None:
        for _ in range(64):  # then let the waiting connections have a turn
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(error)
                return  # ECONNABORTED and the like: the next readiness will tell
            sock.setblocking(False)
            # A socket reset before we got to it fails at its first read instead.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.open_connections() >= self._budget.max_connections and not self._shed():
                sock.close()
                continue
            tls = self._app.web_config.ssl_context is not None
            connection = Connection(sock, str(address[0]), time.monotonic(), tls)
            self._watch(connection)

    def _out_of_descriptors(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning(
                "out of descriptors accepting a connection (%s): shedding the oldest idle "
                "connection; %d open",
                error.strerror,
                self.open_connections(),
            )
        if not self._shed():  # nothing to free: stop asking the listener for a moment
            self._selector.unregister(self._listener)
            self._accept_paused_until = now + _ACCEPT_PAUSE_SECONDS

    def _shed(self) -> bool:
        """Close the waiting connection that matters least; False when there is none."""
        if not self._waiting:
            return False
        victim = min(self._waiting.values(), key=Connection.shed_order)
        log.debug("shedding the connection from %s", victim.address)
        self._close(victim)
        return True

    def _watch(self, connection: Connection) -> None:
        fd = connection.fd
        self._waiting[fd] = connection
        self._selector.register(fd, selectors.EVENT_READ, connection)

    def _close(self, connection: Connection) -> None:
        fd = connection.fd
        if self._waiting.pop(fd, None) is not None:
            self._selector.unregister(fd)
        with contextlib.suppress(OSError):
            connection.sock.close()

    def _readable(self, connection: Connection) -> None:
        if connection.handshaking and not self._secure(connection):
            return
        if not connection.read(time.monotonic()):
            self._close(connection)
            return
        self._dispatch(connection)

    def _secure(self, connection: Connection) -> bool:
        """Move the TLS handshake on; True once application data can be read."""
        context = self._app.web_config.ssl_context
        if not isinstance(connection.sock, ssl.SSLSocket):
            if context is None:
                connection.handshaking = False  # TLS was switched off by a reload
                return True
            started = connection.start_tls(context)
            if not started:
                if started is False:
                    self._close(connection)
                return False
        done = connection.handshake()
        if done is None:
            return False
        if not done:
            log.debug("TLS handshake with %s failed", connection.address)
            self._close(connection)
            return False
        allowed = self._app.web_config.tls
        if allowed is not None and allowed.client_allowed_sans:
            sans = client_sans(connection.sock.getpeercert())  # type: ignore[attr-defined]
            if not set(sans) & set(allowed.client_allowed_sans):
                log.info(
                    "refused TLS client %s: no allowed SAN in its certificate (%s)",
                    connection.address,
                    ", ".join(sans) or "none",
                )
                self._close(connection)
                return False
        return True

    def _dispatch(self, connection: Connection) -> None:
        """Hand a complete request head to the workers (or answer it here when it is bad)."""
        try:
            head = connection.take_head()
        except ProtocolError as error:
            self._refuse(connection, text_response(error.status, str(error)))
            return
        if head is None:
            return
        try:
            trusted, answer = self._app.triage(parse_head(head).headers, connection.address)
        except ProtocolError:
            trusted, answer = False, None  # the worker answers the malformed head
        if answer is not None:
            self._refuse(connection, answer)
            return
        if not trusted:
            with self._queued_lock:
                full = self._untrusted_queued >= limits.READY_QUEUE
                if not full:
                    self._untrusted_queued += 1
            if full:
                overloaded = text_response(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "Too many parallel requests",
                    ("Retry-After", "1"),
                )
                self._refuse(connection, overloaded)
                return
        fd = connection.fd
        del self._waiting[fd]
        self._selector.unregister(fd)
        rank = _TRUSTED if trusted else _UNTRUSTED
        self._ready.put_nowait((rank, next(self._sequence), (connection, head)))
        self._busy += 1

    def _refuse(self, connection: Connection, response: Response) -> None:
        data = response_bytes(
            SERVER_VERSION, response.status, response.content_type, response.body,
            response.headers, keep_alive=False, head_only=False,
        )  # fmt: skip
        fd = connection.fd
        if self._waiting.pop(fd, None) is not None:
            self._selector.unregister(fd)
        answer_and_close(connection.sock, data)

    def _take_returned(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        now = time.monotonic()
        while True:
            try:
                connection, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            self._busy -= 1
            if not keep:
                with contextlib.suppress(OSError):
                    connection.sock.close()
                continue
            connection.wait_for_request(now)
            self._watch(connection)
            self._dispatch(connection)  # a pipelined request may be buffered already

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full wake buffer wakes it already
            self._wake_write.send(b"\0")

    # -- the workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            rank, _, item = self._ready.get()
            if item is None:
                return
            if rank == _UNTRUSTED:
                with self._queued_lock:
                    self._untrusted_queued -= 1
            connection, head = item
            try:
                keep = self._answer(connection, head)
            except Exception:  # one broken request must not cost the server a worker
                log.exception("error answering a request from %s", connection.address)
                keep = False
            self._returned.put((connection, keep and not self._stopping.is_set()))
            self._wake()

    def _answer(self, connection: Connection, head: bytes) -> bool:
        """Answer one request; True to keep the connection for the next one."""
        try:
            request = parse_head(head)
        except ProtocolError as error:
            return self._send(connection, text_response(error.status, str(error)), False, False)
        try:
            response = self._app.respond(
                request.method, request.target, request.headers, connection.address
            )
        except Exception:  # one broken request must not cost the server its worker
            log.exception("error answering %s %s", request.method, request.target)
            response = text_response(
                HTTPStatus.INTERNAL_SERVER_ERROR, "Internal error (see the log)"
            )
        if 200 <= response.status < 300:
            connection.answered = True
        head_only = request.method == "HEAD"
        return self._send(connection, response, request.keep_alive, head_only)

    def _send(self, connection: Connection, response: Response, keep: bool, head: bool) -> bool:
        data = response_bytes(
            SERVER_VERSION, response.status, response.content_type, response.body,
            response.headers, keep, head,
        )  # fmt: skip
        sock = connection.sock
        try:
            sock.settimeout(limits.WRITE_TIMEOUT_SECONDS)
            sock.sendall(data)
            sock.settimeout(0.0)
        except (OSError, ValueError) as error:
            log.debug("sending to %s failed: %s", connection.address, error)
            return False
        return keep


def _bind(listen: ListenAddress) -> socket.socket:
    if listen.host == "":
        try:
            return _listening(socket.AF_INET6, ("::", listen.port), dual_stack=True)
        except OSError as error:
            if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise ListenError(_bind_failure(listen, error)) from None
        # No IPv6 in this kernel or namespace: every IPv4 address will do.
        return _try_bind(listen, socket.AF_INET, ("0.0.0.0", listen.port))
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(
            f'cannot listen on {listen}: cannot resolve "{listen.host}": {error.strerror}'
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return _try_bind(listen, family, sockaddr)


def _listening(
    family: socket.AddressFamily, address: tuple[Any, ...], dual_stack: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _try_bind(
    listen: ListenAddress, family: socket.AddressFamily, address: tuple[Any, ...]
) -> socket.socket:
    try:
        return _listening(family, address)
    except OSError as error:
        raise ListenError(_bind_failure(listen, error)) from None


def _bind_failure(listen: ListenAddress, error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        reason = "the port is already in use (another tcpwatch or exporter running?)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = "no interface of this host has that address"
    elif error.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    return f"cannot listen on {listen}: {reason}"
