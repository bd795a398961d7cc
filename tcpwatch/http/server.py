"""The listening socket of `tcpwatch serve`: connections, request threads, TLS, limits.

One selector thread accepts connections, runs TLS handshakes, reads request heads and writes
what slow readers have not taken yet, all without blocking; a small pool of worker threads
answers complete requests through the :class:`~tcpwatch.http.app.WebApp` (see
tcpwatch.http.connection for who holds a connection when). That shape is what holds slow and
hostile clients: a client that drips its headers, never speaks or never reads costs a
descriptor, not a thread, and is dropped when its deadline passes; a request whose password
needs bcrypt waits for the check without a worker (tcpwatch.http.checks).

Nothing one connection does can stop the server: every step of a connection runs under a guard
that closes that connection alone, and the loop itself logs and goes on. Should a thread die
anyway, :meth:`WebServer.problem` says so, which /-/healthy, the systemd watchdog and the
daemon's main loop act on.

Open connections are capped well below the descriptor limit (tcpwatch.http.limits); at the cap,
or when accept() runs out of descriptors, held connections are shed as tcpwatch.http.shedding
decides, so a new client always gets its chance and the accept loop never spins.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from http import HTTPStatus

from tcpwatch.http import checks, limits
from tcpwatch.http.app import Response, WebApp, text_response
from tcpwatch.http.auth import AuthResult, Pending, Verdict, client_key
from tcpwatch.http.connection import Connection, State
from tcpwatch.http.limits import DescriptorBudget, descriptor_budget
from tcpwatch.http.listen import ListenAddress, bind
from tcpwatch.http.shedding import HeldConnections
from tcpwatch.http.wire import ProtocolError, answer_and_close, parse_head, response_head
from tcpwatch.http.workers import SERVER_VERSION, ThrottledLog, Workers

log = logging.getLogger(__name__)

_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_PAUSE_SECONDS = 0.5  # when nothing can be shed to free a descriptor
_SWEEP_SECONDS = 0.1
_PARKED_SLACK_SECONDS = 5.0  # a parked connection outlives its check's own deadline by this
_LISTENER = "listener"
_WAKE = "wake"


class WebServer:
    """The listening socket, its selector thread and its workers."""

    def __init__(
        self, listen: ListenAddress, app: WebApp, budget: DescriptorBudget | None = None
    ) -> None:
        self._budget = budget or descriptor_budget()
        self._app = app
        self._listener = bind(listen)
        self._listener.setblocking(False)
        host, port = self._listener.getsockname()[:2]
        self.address = ListenAddress(str(host), int(port))
        app.listening_on = str(self.address)
        log.info("%s", limits.describe(self._budget))
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        app.on_reload(self._wake)
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        # Handed to the selector thread: connections back from a worker, finished checks.
        self._returned: queue.SimpleQueue[tuple[Connection, bool]] = queue.SimpleQueue()
        self._checked: queue.SimpleQueue[tuple[Connection, Pending]] = queue.SimpleQueue()
        self._errors = ThrottledLog()
        self._workers = Workers(app, self._done, self._errors.error)
        # Owned by the selector thread.
        self._held = HeldConnections(self._selector, app.cancel)
        self._deferred: collections.deque[Connection] = collections.deque()  # waiting for room
        self._generation = app.admission.generation
        self._stopping = self._workers.stopping
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
        return self._held.open()

    def problem(self) -> str | None:
        """Why the server can no longer answer (a thread of it died), or None."""
        if self._stopping.is_set() or not self._threads:
            return None
        dead = [thread.name for thread in self._threads if not thread.is_alive()]
        if dead:
            return f"the HTTP server's thread {', '.join(dead)} died (see the log)"
        return None

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, name="http", daemon=True)]
        self._threads += self._workers.threads()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._workers.stop()
        self._wake()
        if self._threads:
            self._threads[0].join(timeout=1.0)
        self._listener.close()
        self._wake_write.close()

    # -- the selector thread: its loop -----------------------------------------------------------

    def _run(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_read, selectors.EVENT_READ, _WAKE)
        try:
            while not self._stopping.is_set():
                try:
                    self._loop_once()
                except Exception:  # a bug must not stop the server; it is logged, not hidden
                    self._errors.error("the HTTP server loop failed; going on")
                    time.sleep(0.05)
        finally:
            for connection in list(self._held.by_fd.values()):
                self._held.close(connection)
            self._selector.close()
            self._wake_read.close()

    def _loop_once(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        busy = self._app.checks_pending() or self._app.admission.generation != self._generation
        sleep = self._held.sleep(now, self._accept_paused_until, busy)  # an idle server sleeps
        for key, mask in self._selector.select(sleep):
            if key.data is _LISTENER:
                self._accept()
            elif key.data is _WAKE:
                self._take_returned()
            else:
                connection = self._held.get(key.fd)
                if connection is key.data and connection is not None:  # not closed this batch
                    self._guarded(connection, mask)
        now = time.monotonic()
        if now - self._last_sweep >= _SWEEP_SECONDS:
            self._last_sweep = now
            self._sweep(now)

    def _guarded(self, connection: Connection, mask: int) -> None:
        """One connection's event; whatever goes wrong closes that connection only."""
        try:
            if connection.admission.generation != self._app.admission.generation:
                self._held.close(connection)  # let in under a TLS policy a reload replaced
            elif connection.state is State.WRITING:
                self._write(connection)
            elif connection.state is State.PARKED:
                self._parked_readable(connection)
            else:
                self._readable(connection)
        except (OSError, ValueError) as error:
            log.debug("connection from %s failed: %s", connection.address, error)
            self._held.close(connection)
        except Exception:
            self._errors.error("error handling a connection from %s", connection.address)
            self._held.close(connection)

    def _sweep(self, now: float) -> None:
        self._app.expire_checks()
        generation = self._app.admission.generation
        if generation != self._generation:
            self._generation = generation
            for connection in list(self._held.by_fd.values()):
                if connection.admission.generation == generation:
                    continue
                if connection.state is State.WRITING:
                    connection.keep = False  # its answer began under the old policy: finish it
                else:
                    self._held.close(connection)
        for connection in [c for c in self._held.by_fd.values() if c.deadline <= now]:
            if connection.state is State.PARKED and connection.verdict is not None:
                busy = text_response(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "Too many parallel requests",
                    ("Retry-After", "1"),
                )
                self._refuse(connection, busy)  # waited for a worker in vain
            else:
                self._held.close(connection)  # idle too long, its head or its reader too slow

    # -- accepting and shedding ------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):  # then let the held connections have a turn
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(error)
                return  # ECONNABORTED and the like: the next readiness will tell
            try:
                self._admit(sock, str(address[0]))
            except Exception:
                self._errors.error("error accepting a connection from %s", address[0])
                with contextlib.suppress(OSError):
                    sock.close()

    def _admit(self, sock: socket.socket, address: str) -> None:
        sock.setblocking(False)
        # A socket reset before we got to it fails at its first read instead.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        if self._held.open() >= self._budget.max_connections and not self._make_room(now):
            sock.close()
            return
        connection = Connection(sock, address, client_key(address), now, self._app.admission)
        self._held.add(connection)
        self._held.watch(connection, selectors.EVENT_READ)

    def _make_room(self, now: float) -> bool:
        """Shed held connections (tcpwatch.http.shedding); False when none can go.

        What the held connections have to say is heard first: in a connect-and-close flood
        many of them are gone already, and closing those makes room without taking anyone's.
        """
        for key, mask in self._selector.select(0):
            connection = self._held.get(key.fd)
            if connection is key.data and connection is not None:
                self._guarded(connection, mask)
        if self._held.open() < self._budget.max_connections:
            return True
        return self._held.shed(now, self._budget.max_connections)

    def _out_of_descriptors(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning(
                "out of descriptors accepting a connection (%s): shedding held connections; "
                "%d open",
                error.strerror,
                self._held.open(),
            )
        if not self._make_room(now):  # nothing to free: stop asking the listener for a moment
            self._selector.unregister(self._listener)
            self._accept_paused_until = now + _ACCEPT_PAUSE_SECONDS

    # -- what the selector thread does for a connection ------------------------------------------

    def _readable(self, connection: Connection) -> None:
        if connection.state is State.HANDSHAKE and not self._secure(connection):
            return
        if not connection.read(time.monotonic()):
            self._held.close(connection)
            return
        self._dispatch(connection)

    def _secure(self, connection: Connection) -> bool:
        """Move the TLS handshake on; True once application data can be read."""
        done = connection.secure()
        if done is False:
            self._held.close(connection)
        return bool(done)

    def _parked_readable(self, connection: Connection) -> None:
        """A connection waiting for its check: a client that hangs up gives its place up;
        what it sends meanwhile is kept, up to the head limit, for after its answer."""
        if not connection.read(time.monotonic()):
            self._held.close(connection)
        elif connection.full:
            self._held.watch(connection, 0)

    def _dispatch(self, connection: Connection) -> None:
        """Hand a complete request head on: answered here when bad, parked for its password
        check, or queued for the workers."""
        try:
            head = connection.take_head()
            if head is None:
                return
            headers = parse_head(head).headers
        except ProtocolError as error:
            self._refuse(connection, text_response(error.status, str(error)))
            return

        def checked(pending: Pending) -> None:  # on the bcrypt thread
            self._checked.put((connection, pending))
            self._wake()

        triage = self._app.triage(headers, connection.address, checked)
        if triage.pending is not None:
            now = time.monotonic()
            connection.head = head
            connection.pending = triage.pending
            deadline = now + checks.CHECK_WAIT_SECONDS + _PARKED_SLACK_SECONDS
            connection.enter(State.PARKED, now, deadline)
            return
        assert triage.verdict is not None
        self._queue(connection, head, triage.trusted, triage.verdict)

    def _queue(self, connection: Connection, head: bytes, trusted: bool, verdict: Verdict) -> None:
        """To the workers; when READY_QUEUE untrusted requests wait already, the connection
        waits parked for room (up to DEFERRED of them, each for up to 10 s), else 503."""
        if self._workers.submit(connection, head, trusted, verdict):
            self._held.to_worker(connection)
            return
        if len(self._deferred) >= limits.DEFERRED:
            overloaded = text_response(
                HTTPStatus.SERVICE_UNAVAILABLE, "Too many parallel requests", ("Retry-After", "1")
            )
            self._refuse(connection, overloaded)
            return
        now = time.monotonic()
        connection.head = head
        connection.verdict = verdict
        connection.enter(State.PARKED, now, now + limits.WRITE_TIMEOUT_SECONDS)
        self._held.watch(connection, selectors.EVENT_READ)  # to hear it hang up
        self._deferred.append(connection)

    def _undefer(self) -> None:
        """Requests that waited for room in the queue, in their order, while there is room."""
        deferred = self._deferred
        while deferred:
            connection = deferred[0]
            verdict = connection.verdict
            waiting = self._held.holds(connection) and connection.pending is None
            if not waiting or connection.state is not State.PARKED or verdict is None:
                deferred.popleft()  # closed, or gone on meanwhile
                continue
            if not self._workers.submit(connection, connection.head, False, verdict):
                return
            deferred.popleft()
            connection.verdict = None
            self._held.to_worker(connection)

    def _refuse(self, connection: Connection, response: Response) -> None:
        """A short last answer, written here, and the connection closed."""
        data = response_head(
            SERVER_VERSION, response.status, response.content_type, response.length,
            response.headers, keep_alive=False,
        ) + response.body  # fmt: skip
        if self._held.holds(connection):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._held.watch(connection, 0)
        answer_and_close(connection.sock, data)
        self._held.close(connection)  # the accounting; the socket is closed already

    def _write(self, connection: Connection) -> None:
        if not connection.flush():
            return
        self._written(connection, time.monotonic())

    def _written(self, connection: Connection, now: float) -> None:
        """A response is out: wait for the next request, or close."""
        stale = connection.admission.generation != self._app.admission.generation
        if not connection.keep or stale:
            self._held.close(connection, graceful=True)
            return
        connection.wait_for_request(now)
        self._held.watch(connection, selectors.EVENT_READ)
        sock = connection.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending() and not connection.read(now):
            self._held.close(connection)  # what TLS decrypted already would never wake the selector
            return
        self._dispatch(connection)  # a pipelined request may be buffered already

    def _take_returned(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_read.recv(4096):
                pass
        while True:
            try:
                connection, pending = self._checked.get_nowait()
            except queue.Empty:
                break
            if connection.pending is pending and self._held.holds(connection):
                self._guarded_checked(connection, pending)
        while True:
            try:
                connection, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            self._held.from_worker(connection)
            self._guarded_returned(connection, keep)
            self._undefer()

    def _guarded_checked(self, connection: Connection, pending: Pending) -> None:
        connection.pending = None
        verdict = pending.verdict or Verdict(AuthResult.BUSY)
        try:
            trusted = verdict.result is AuthResult.OK
            self._queue(connection, connection.head, trusted, verdict)
        except (OSError, ValueError) as error:
            log.debug("connection from %s failed: %s", connection.address, error)
            self._held.close(connection)
        except Exception:
            self._errors.error("error queueing a request from %s", connection.address)
            self._held.close(connection)

    def _guarded_returned(self, connection: Connection, keep: bool) -> None:
        now = time.monotonic()
        try:
            if self._stopping.is_set():
                self._held.close(connection)
                return
            connection.keep = keep
            if connection.output:
                connection.enter(State.WRITING, now, now + limits.WRITE_TIMEOUT_SECONDS)
                self._held.watch(connection, selectors.EVENT_WRITE)
            else:
                self._written(connection, now)
        except (OSError, ValueError) as error:
            log.debug("connection from %s failed: %s", connection.address, error)
            self._held.close(connection)
        except Exception:
            self._errors.error("error taking back a connection from %s", connection.address)
            self._held.close(connection)

    def _done(self, connection: Connection, keep: bool) -> None:  # on a worker's thread
        self._returned.put((connection, keep))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full wake buffer wakes it already
            self._wake_write.send(b"\0")
