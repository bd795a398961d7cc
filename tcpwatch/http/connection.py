"""One client connection of the HTTP server, and the bytes of HTTP/1.1 it reads and writes.

A connection alternates between two owners. While it waits for a request (a TLS handshake, the
request line and headers, or idle between kept-alive requests) it belongs to the server's
selector thread, which reads without blocking and holds no thread for it; once a whole request
head has arrived it goes to a worker thread, which answers it and hands it back. So a slow or
silent client costs one descriptor and a buffer, never a thread.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import io
import socket
import ssl
from dataclasses import dataclass
from http import HTTPStatus

from tcpwatch.http import limits

_TLS_HANDSHAKE_RECORD = 0x16
# What Go's net/http answers on its TLS port to a plain HTTP request: status and reason.
PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)


class ProtocolError(Exception):
    """A request the server cannot take: answered with ``status`` and the connection closed."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    keep_alive: bool


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (``head`` ends at the blank line)."""
    line, _, rest = head.partition(b"\n")
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper():
        raise ProtocolError(HTTPStatus.BAD_REQUEST, "Bad request line")
    method, target, version = (part.decode("latin-1") for part in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 or 1.1 only")
    if not target or any(ord(char) <= 0x20 or ord(char) == 0x7F for char in target):
        raise ProtocolError(HTTPStatus.BAD_REQUEST, "Bad request target")
    try:
        message = http.client.parse_headers(io.BytesIO(rest))
    except (http.client.HTTPException, ValueError):
        raise ProtocolError(HTTPStatus.BAD_REQUEST, "Bad headers") from None
    headers = {name.lower(): value for name, value in message.items()}
    connection = headers.get("connection", "").lower()
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    # A body we will not read may follow: answer, then close rather than parse it as a request.
    has_body = "transfer-encoding" in headers or headers.get("content-length", "").strip() not in (
        "",
        "0",
    )
    if method not in ("GET", "HEAD") or has_body:
        keep_alive = False
    return Request(method, target, headers, keep_alive)


def response_bytes(
    server: str,
    status: int,
    content_type: str,
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    keep_alive: bool,
    head_only: bool,
) -> bytes:
    """One response, status line to body, for a single send()."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Server: {server}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def answer_and_close(sock: socket.socket, data: bytes) -> None:
    """Send a short last answer (best effort) and close without a reset.

    What the client sent and we did not read would make close() send an RST, which can destroy
    the answer before the client reads it: read it away first and end our side with a FIN.
    """
    with contextlib.suppress(OSError, ValueError):
        sock.send(data)
        for _ in range(16):
            if not sock.recv(65536):
                break
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


def _head_end(buffer: bytearray) -> int:
    """Where the request head ends (after its blank line), or -1."""
    ends = [i + n for i, n in ((buffer.find(b"\r\n\r\n"), 4), (buffer.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


class Connection:
    """A client socket with what was read from it and when it must have sent a request by."""

    __slots__ = (
        "address",
        "answered",
        "buffer",
        "deadline",
        "fd",
        "handshaking",
        "sock",
        "waiting_since",
    )

    def __init__(self, sock: socket.socket, address: str, now: float, tls: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: a closed socket's fileno() is -1
        self.address = address
        self.buffer = bytearray()
        self.handshaking = tls  # TLS not yet established (the first bytes not yet checked)
        self.answered = False  # a request on it got a 2xx: shed after the ones that never did
        self.waiting_since = now
        self.deadline = now + limits.HEADER_DEADLINE_SECONDS

    def wait_for_request(self, now: float) -> None:
        """Back from a worker: idle until the next request begins."""
        self.waiting_since = now
        self.deadline = now + (
            limits.HEADER_DEADLINE_SECONDS if self.buffer else limits.IDLE_SECONDS
        )

    def shed_order(self) -> tuple[bool, float]:
        return (self.answered, self.waiting_since)

    def start_tls(self, context: ssl.SSLContext) -> bool | None:
        """Check the first bytes and start TLS: None = wait for more, False = close the client.

        A plain HTTP request gets Go's 400 answer before the connection is closed.
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
        self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        return True

    def handshake(self) -> bool | None:
        """Advance the TLS handshake: True = done, None = wait, False = failed."""
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (OSError, ValueError):
            return False
        self.handshaking = False
        return True

    def read(self, now: float) -> bool:
        """Read what has arrived; False when the client closed or the connection broke."""
        while len(self.buffer) <= limits.MAX_HEADER_BYTES:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return True
            except ssl.SSLWantWriteError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            if not self.buffer:  # the first byte of a request starts its whole-head deadline
                self.deadline = min(self.deadline, now + limits.HEADER_DEADLINE_SECONDS)
            self.buffer += chunk
        return True

    def take_head(self) -> bytes | None:
        """The next complete request head, removed from the buffer; None if incomplete.

        ProtocolError(431) when the head outgrows MAX_HEADER_BYTES.
        """
        while self.buffer.startswith((b"\r", b"\n")):  # blank lines between requests
            del self.buffer[:1]
        end = _head_end(self.buffer)
        if end < 0 or end > limits.MAX_HEADER_BYTES:
            if len(self.buffer) > limits.MAX_HEADER_BYTES:
                raise ProtocolError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Request headers too large"
                )
            return None
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return head
