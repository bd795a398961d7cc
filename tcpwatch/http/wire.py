"""The bytes of HTTP/1.1 the server reads and writes: request heads in, response heads out.

Deliberately narrow: a request line and headers (parsed by ``http.client.parse_headers``), no
request bodies. A request that announces a body is answered and its connection closed, so
nothing a client sends after its head is ever taken for the next request (no smuggling through
Content-Length / Transfer-Encoding disagreements).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import io
import socket
from dataclasses import dataclass
from http import HTTPStatus

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


def response_head(
    server: str,
    status: int,
    content_type: str,
    length: int,
    headers: tuple[tuple[str, str], ...],
    keep_alive: bool,
) -> bytes:
    """A response's status line and headers, up to the blank line."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Server: {server}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer_and_close(sock: socket.socket, data: bytes) -> None:
    """Send a short last answer (best effort, without blocking) and close without a reset.

    What the client sent and we did not read would make close() send an RST, which can destroy
    the answer before the client reads it: read it away first and end our side with a FIN.
    """
    with contextlib.suppress(OSError, ValueError):
        if data:
            sock.send(data)
        for _ in range(16):
            if not sock.recv(65536):
                break
    with contextlib.suppress(OSError, ValueError):
        sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


def head_end(buffer: bytearray) -> int:
    """Where the request head ends (after its blank line), or -1."""
    ends = [i + n for i, n in ((buffer.find(b"\r\n\r\n"), 4), (buffer.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1
