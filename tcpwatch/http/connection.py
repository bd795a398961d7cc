"""One client connection of the HTTP server: its state, what was read, what is left to write.

A connection belongs to one thread at a time. The selector thread holds it while it waits: for
a TLS handshake, for a request head (fresh, idle between kept-alive requests, or arriving), for
a password check (*parked*), or for the client to take the rest of a response (*writing*); it
reads and writes without blocking and holds no thread for it. A worker holds it only to answer
one complete request: it renders the response, writes what the socket takes at once, and hands
the connection back with the rest. So a client that drips, never speaks, or never reads costs a
descriptor and its buffers, never a thread.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import ssl
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING

from tcpwatch.http import limits
from tcpwatch.http.webconfig import client_sans
from tcpwatch.http.wire import PLAIN_HTTP_ON_TLS, ProtocolError, answer_and_close, head_end

if TYPE_CHECKING:
    from tcpwatch.http.app import Admission
    from tcpwatch.http.auth import Pending, Verdict
    from tcpwatch.http.exposition import Chunk

log = logging.getLogger(__name__)

_TLS_HANDSHAKE_RECORD = 0x16
_TLS_CHUNK = 64 * 1024  # one SSL_write; retried with the same bytes when it would block
_IOV_BATCH = 256  # buffers per sendmsg(), well under IOV_MAX


class State(enum.Enum):
    HANDSHAKE = "handshake"  # TLS not yet established (selector)
    READING = "reading"  # waiting for a request head: fresh, idle or arriving (selector)
    PARKED = "parked"  # a complete head waits for its password check or a worker (selector)
    WORKING = "working"  # a worker answers it
    WRITING = "writing"  # the rest of a response waits for the client to read (selector)


class Connection:
    """A client socket, where it is in its life, and its buffers."""

    __slots__ = (
        "address", "admission", "buffer", "closed", "deadline", "events", "fd", "head", "keep",
        "key", "opened", "output", "pending", "requests", "since", "sock", "state", "verdict",
    )  # fmt: skip

    def __init__(
        self, sock: socket.socket, address: str, key: str, now: float, admission: Admission
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: a closed socket's fileno() is -1
        self.address = address
        self.key = key  # the client's share for fairness at the connection cap (its /64 in IPv6)
        self.admission = admission  # the TLS policy it was let in under
        self.buffer = bytearray()
        self.output: deque[memoryview] = deque()
        self.state = State.HANDSHAKE if admission.ssl_context is not None else State.READING
        self.opened = now
        self.since = now  # when it entered its state
        self.deadline = now + limits.HEADER_DEADLINE_SECONDS
        self.requests = 0  # request heads taken from it
        self.events = 0  # what the selector watches it for
        self.head = b""  # a parked request's head
        self.pending: Pending | None = None  # a parked request's password check
        self.verdict: Verdict | None = None  # a parked request's, waiting for a worker
        self.keep = False  # kept alive once the response is written
        self.closed = False

    @property
    def fresh(self) -> bool:
        """Not a single request head yet: what a new client must be given a chance to send."""
        return self.requests == 0 and self.state in (State.HANDSHAKE, State.READING)

    @property
    def idle(self) -> bool:
        """Kept alive after an answer and nothing of a next request arrived."""
        return self.state is State.READING and self.requests > 0 and not self.buffer

    def enter(self, state: State, now: float, deadline: float) -> None:
        self.state = state
        self.since = now
        self.deadline = deadline

    def wait_for_request(self, now: float) -> None:
        """Answered: idle until the next request begins (or its head is buffered already)."""
        wait = limits.HEADER_DEADLINE_SECONDS if self.buffer else limits.IDLE_SECONDS
        self.enter(State.READING, now, now + wait)

    # -- reading ---------------------------------------------------------------------------------

    def start_tls(self, context: ssl.SSLContext) -> bool | None:
        """Check the first bytes and start TLS: None = wait for more, False = close the client.

        A plain HTTP request gets Go's 400 answer before the connection is closed. A client
        that resets meanwhile fails here, as anything else wrong with this one connection does.
        """
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        if not first:
            return False
        if first[0] != _TLS_HANDSHAKE_RECORD:
            if first.isalpha():
                answer_and_close(self.sock, PLAIN_HTTP_ON_TLS)
            return False
        plain = self.sock
        try:
            plain.getpeername()  # reset already: wrap_socket() would fail the same way
            self.sock = context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            # e.g. "Closed before TLS handshake with data in recv buffer": a reset right after
            # the first bytes. wrap_socket() has taken the descriptor; whatever owns it now is
            # closed when dropped, and the plain socket is detached.
            with contextlib.suppress(OSError):
                plain.close()
            return False
        return True

    def secure(self) -> bool | None:
        """Move TLS on: True once application data can be read, None = wait, False = close
        (a failed handshake, or a client certificate without an allowed SAN)."""
        admission = self.admission
        if admission.ssl_context is None:
            return True
        if not isinstance(self.sock, ssl.SSLSocket):
            started = self.start_tls(admission.ssl_context)
            if not started:
                return started
        done = self.handshake()
        if not done:
            if done is False:
                log.debug("TLS handshake with %s failed", self.address)
            return done
        if admission.client_allowed_sans and isinstance(self.sock, ssl.SSLSocket):
            sans = client_sans(self.sock.getpeercert())
            if not set(sans) & set(admission.client_allowed_sans):
                log.info(
                    "refused TLS client %s: no allowed SAN in its certificate (%s)",
                    self.address,
                    ", ".join(sans) or "none",
                )
                return False
        return True

    def handshake(self) -> bool | None:
        """Advance the TLS handshake: True = done, None = wait, False = failed."""
        if not isinstance(self.sock, ssl.SSLSocket):
            return False
        try:
            self.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (OSError, ValueError):
            return False
        self.state = State.READING
        return True

    def read(self, now: float) -> bool:
        """Read what has arrived, up to the head limit; False when the client closed or the
        connection broke."""
        while not self.full:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return True
            except ssl.SSLWantWriteError:
                return True
            except (OSError, ValueError):
                return False
            if not chunk:
                return False
            if not self.buffer and self.state is State.READING:
                # The first byte of a request starts its whole-head deadline.
                self.deadline = min(self.deadline, now + limits.HEADER_DEADLINE_SECONDS)
            self.buffer += chunk
        return True

    @property
    def full(self) -> bool:
        return len(self.buffer) > limits.MAX_HEADER_BYTES

    def take_head(self) -> bytes | None:
        """The next complete request head, removed from the buffer; None if incomplete.

        ProtocolError(431) when the head outgrows MAX_HEADER_BYTES.
        """
        while self.buffer.startswith((b"\r", b"\n")):  # blank lines between requests
            del self.buffer[:1]
        end = head_end(self.buffer)
        if end < 0 or end > limits.MAX_HEADER_BYTES:
            if len(self.buffer) > limits.MAX_HEADER_BYTES:
                raise ProtocolError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Request headers too large"
                )
            return None
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        self.requests += 1
        return head

    # -- writing ---------------------------------------------------------------------------------

    def queue(self, parts: list[Chunk]) -> None:
        """A response to write, as it is: parts shared with other responses are not copied."""
        self.output = deque(memoryview(part) for part in parts if len(part))

    def flush(self) -> bool:
        """Write what the socket takes now; True once everything is written.

        Raises OSError or ValueError when the connection broke (the caller closes it).
        """
        output = self.output
        if isinstance(self.sock, ssl.SSLSocket):
            while output:
                view = output[0]
                try:
                    # A write that would block must be retried with the same bytes: the first
                    # _TLS_CHUNK of the same view, as long as nothing of it was taken.
                    sent = self.sock.send(view[:_TLS_CHUNK])
                except ssl.SSLWantWriteError:
                    return False
                except ssl.SSLWantReadError:
                    # Only a renegotiation makes a write read; none is allowed here.
                    raise ConnectionError("TLS peer wants a handshake while we write") from None
                _advance(output, sent)
            return True
        while output:
            try:
                sent = self.sock.sendmsg(list(_first(output, _IOV_BATCH)))
            except (BlockingIOError, InterruptedError):
                return False
            _advance(output, sent)
        return True

    def close(self, graceful: bool) -> None:
        """Close: after a complete answer with a FIN (and what the client sent read away), or
        at once."""
        if self.closed:
            return
        self.closed = True
        self.output.clear()
        if graceful:
            answer_and_close(self.sock, b"")
            return
        with contextlib.suppress(OSError):
            self.sock.close()


def _first(output: deque[memoryview], count: int) -> list[memoryview]:
    return [output[i] for i in range(min(count, len(output)))]


def _advance(output: deque[memoryview], sent: int) -> None:
    while sent and output:
        view = output[0]
        if sent >= len(view):
            sent -= len(view)
            output.popleft()
        else:
            output[0] = view[sent:]
            sent = 0
