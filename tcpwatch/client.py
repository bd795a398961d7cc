"""Reading a running `tcpwatch serve` over its JSON API (docs/api.md), for `check --from` and
`top --from`.

The URL may carry basic-auth credentials (``https://user:password@host:9477``); HTTPS verifies
the server against the system's CA store, or the file ``SSL_CERT_FILE`` names. Every failure is
a :class:`DaemonError` whose message is one line saying what is wrong and what to do.

The server is not trusted (docs/security.md): one deadline covers the whole request, the body is
read in chunks up to MAX_BODY_BYTES, the JSON is parsed within bounds and read field by field
with its types checked (tcpwatch/jsonshape.py), and what the server says is escaped before it
reaches a message.
"""

from __future__ import annotations

import base64
import http.client
import io
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tcpwatch.errors import UsageError
from tcpwatch.escape import terminal
from tcpwatch.jsonshape import Shape, ShapeError, parse_bounded
from tcpwatch.model import Snapshot, SourceStatus
from tcpwatch.render.json import findings_from_document
from tcpwatch.render.status import Gauges
from tcpwatch.rules import Finding

# A 10,000-finding report (the API's largest page) is about 11 MiB; a runaway or hostile server
# is cut off here, read in chunks, before it costs more.
MAX_BODY_BYTES = 16 * 1024 * 1024
_CHUNK = 64 * 1024


class DaemonError(UsageError):
    """The daemon could not be read: unreachable, refused us, or answered something else."""


class _Deadline:
    """One deadline for a whole request: connect, TLS, sending, headers and body together."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; socket.timeout once there are none (a dripping server ends here)."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline")
        return left


class _DeadlineSocket:
    """What http.client uses of its socket (sendall, makefile, close), under one deadline.

    As with ``socket.makefile``, the descriptor is closed once the socket and every reader made
    from it are closed: http.client closes the connection's socket before it reads a body that
    ends with the connection."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline
        self._readers = 0
        self._closed = False

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.left())
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._sock.settimeout(self._deadline.left())
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closed:
            self.close()

    def close(self) -> None:
        self._closed = True
        if self._readers <= 0:
            self._sock.close()


class _DeadlineReader(io.RawIOBase):
    """A reader of a _DeadlineSocket: each read gets only the time the deadline has left."""

    def __init__(self, sock: _DeadlineSocket) -> None:
        super().__init__()
        self._sock: _DeadlineSocket | None = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._sock is None:
            raise ValueError("I/O operation on closed reader")
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.reader_closed()
        super().close()


class _HTTP(http.client.HTTPConnection):
    deadline: _Deadline

    def connect(self) -> None:
        self.timeout = self.deadline.left()  # connect and, for HTTPS, the handshake
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline)


class _HTTPS(http.client.HTTPSConnection):
    deadline: _Deadline

    def connect(self) -> None:
        self.timeout = self.deadline.left()
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline)


@dataclass(frozen=True, slots=True)
class Daemon:
    """Where a daemon listens and how to log in."""

    scheme: str
    host: str
    port: int
    authorization: str | None  # the Authorization header, from the URL's user:password
    shown: str  # the URL without its password, for messages

    def get_json(
        self, path: str, query: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> Any:
        """GET path (with ``query``) and parse the JSON answer, all within ``timeout`` seconds
        and MAX_BODY_BYTES; DaemonError (one line) otherwise."""
        target = path + ("?" + urllib.parse.urlencode(dict(query)) if query else "")
        status, raw_reason, body = self._get(target, timeout)
        where = f"tcpwatch at {self.shown}"
        reason = terminal(raw_reason[:100])  # the server's words: escaped, bounded
        if status in (401, 403):
            raise DaemonError(
                f"{where} answered {status} {reason}: give the user and password in the URL "
                "(https://USER:PASSWORD@host:9477) as its web config's basic_auth_users expects"
            )
        if status != 200:
            first = body[:4096].decode("utf-8", "replace").strip().splitlines()[:1]
            detail = terminal(first[0][:200]) if first else ""
            raise DaemonError(
                f"{where} answered {status} {reason} for {path}"
                + (f": {detail}" if detail else "")
                + ("" if status < 500 else " (see its log)")
            )
        try:
            return parse_bounded(body)
        except ShapeError as error:
            raise DaemonError(
                f"{where} answered {path} with something that is not a tcpwatch document "
                f"({error}): is this a tcpwatch serve, version 0.x with /api/v1?"
            ) from None

    def _get(self, target: str, timeout: float) -> tuple[int, str, bytes]:
        deadline = _Deadline(timeout)
        connection: _HTTP | _HTTPS
        if self.scheme == "https":
            connection = _HTTPS(self.host, self.port, context=ssl.create_default_context())
        else:
            connection = _HTTP(self.host, self.port)
        connection.deadline = deadline
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            return response.status, response.reason, self._body(response)
        except ssl.SSLError as error:
            raise DaemonError(
                f"TLS with tcpwatch at {self.shown} failed: {error.reason or error}; "
                "point SSL_CERT_FILE at the CA that signed its certificate"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            if isinstance(error, TimeoutError):
                text = f"no complete answer within {timeout:g} s"
            text = terminal(text[:200]) or type(error).__name__  # may quote the server's bytes
            raise DaemonError(
                f"cannot reach tcpwatch at {self.shown}: {text} "
                "(is `tcpwatch serve` running there, and is the URL right?)"
            ) from None
        finally:
            connection.close()

    def _body(self, response: http.client.HTTPResponse) -> bytes:
        """The body, read in chunks and refused as soon as it passes MAX_BODY_BYTES."""
        if (response.length or 0) > MAX_BODY_BYTES:
            raise DaemonError(self._too_big(response.length))
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read(_CHUNK):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise DaemonError(self._too_big(None))
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_big(self, length: int | None) -> str:
        what = f"{length} bytes" if length is not None else "more"
        return (
            f"tcpwatch at {self.shown} answered {what}, over the {MAX_BODY_BYTES >> 20} MiB "
            "a tcpwatch document can take: is the URL right?"
        )


def parse_daemon_url(url: str) -> Daemon:
    """``http[s]://[user:password@]host[:port]`` (port 9477 when absent); UsageError if not."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DaemonError(f'--from: expected a URL like http://127.0.0.1:9477, got "{url[:100]}"')
    try:
        port = parts.port or 9477
    except ValueError:
        raise DaemonError(f'--from: the port in "{url[:100]}" is not a number 1-65535') from None
    authorization = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        authorization = f"Basic {token}"
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    return Daemon(parts.scheme, host, port, authorization, f"{parts.scheme}://{shown_host}:{port}")


@dataclass(frozen=True, slots=True)
class RemoteReport:
    """A daemon's /api/v1/findings, every field checked. Its status and exit code are not read:
    they are the findings' to say (:func:`tcpwatch.render.status.status_of`)."""

    findings: tuple[Finding, ...]
    snapshots: tuple[Snapshot, ...]  # bare: name, time and sources, for the report's header
    gauges: Gauges
    window_seconds: float
    findings_total: int | None  # when the daemon cut the list


def report_from_document(daemon: Daemon, document: Any) -> RemoteReport:
    """The report in a /api/v1/findings document; DaemonError naming the first wrong field when
    the document is not a check report."""
    try:
        root = Shape(document)
        findings = findings_from_document(document)
        sources: dict[str, list[SourceStatus]] = {}
        for item in root.field("sources").items():
            skipped = item.field("skipped", required=False)  # absent before 12 item 8
            sources.setdefault(item.field("netns").string(), []).append(
                SourceStatus(
                    item.field("name").string(),
                    item.field("ok").boolean(),
                    item.field("duration_seconds").number(),
                    item.field("error").optional_string(),
                    () if skipped.is_null() else tuple(skipped.strings()),
                )
            )
        snapshots = []
        for item in root.field("namespaces").items():
            netns = item.field("netns").string()
            snapshots.append(
                Snapshot(
                    netns=netns,
                    taken_at=item.field("taken_at").number(),
                    sockets=None,
                    counters=None,
                    sockstat=None,
                    sysctls=None,
                    attribution=None,
                    sources=tuple(sources.get(netns, ())),
                )
            )
        gauges = root.field("gauges", required=False)
        if not gauges.is_null():
            for name in ("accept_queue_fill", "close_wait", "time_wait", "orphans"):
                gauges.field(name, required=False).optional_number()
        total = root.field("findings_total", required=False).optional_integer()
        window = root.field("window_seconds").number()
    except ShapeError as error:
        raise DaemonError(
            f"tcpwatch at {daemon.shown} answered /api/v1/findings with an unexpected document "
            f"({error}); is it the same tcpwatch version?"
        ) from None
    return RemoteReport(
        tuple(findings), tuple(snapshots), Gauges.from_json(gauges.value), window, total
    )
