"""Where `tcpwatch check` looks for the sockets' owners first: the local daemon's.

A one-shot check must otherwise walk every process' descriptors (/proc/*/fd) for the owners of
the listeners and CLOSE_WAIT sockets, which on a busy host costs more than the rest of the check.
A daemon running here already knows where they are. So, before its poll, check:

1. looks at what listens at the daemon's usual local address (``listen``) and refuses a
   listener that is not root's, the caller's or tcpwatch.service's (top/local.py, as `top`);
2. asks it ``/api/v1/owners`` over plain HTTP on that address, within ``ASK_SECONDS``;
3. confirms that the process the answer names as the holder of the daemon's own listener holds
   it (one readlink) and is tcpwatch (its command line);
4. hands the answer's locations to the poll as *hints*: the ``processes`` source confirms each
   with one readlink of /proc/PID/fd/FD against ``socket:[INODE]`` and re-reads the name from
   /proc/PID/comm, and walks /proc/*/fd only for the sockets still without an owner.

Nothing the daemon says is printed: a location that does not hold is dropped, names are read
here. No daemon, one that cannot be verified, a wrong or late answer: the walk, as before, after
at most ``ASK_SECONDS`` (a refused connection costs a fraction of a millisecond).

The request is a bare HTTP/1.1 GET on a socket: ``http.client`` imports ``ssl``, about 30-50 ms
of a check's start-up, for a loopback address that never speaks TLS.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from tcpwatch.config import Config
from tcpwatch.endpoints import local_daemon_url
from tcpwatch.jsonshape import Shape, ShapeError, parse_bounded
from tcpwatch.model import Attribution
from tcpwatch.paths import ProcPaths
from tcpwatch.render.api import MAX_OWNERS_LIMIT
from tcpwatch.render.scope import OwnersOrigin
from tcpwatch.top.local import listening_at, verify_claimed

ASK_SECONDS = 0.08  # the whole attempt's network part: connect, ask, read the answer
MAX_ANSWER_BYTES = 4 << 20  # 10,000 owners are about 800 KB
PATH = f"/api/v1/owners?limit={MAX_OWNERS_LIMIT}"


@dataclass(frozen=True, slots=True)
class OwnerHints:
    """What the local daemon said, still to be confirmed socket by socket (``known``: None when
    it is not used), and what check says about it (``origin``)."""

    known: Attribution | None
    origin: OwnersOrigin


class AnswerError(Exception):
    """The daemon's answer could not be read: one line saying why."""


def parse_owners(document: Any) -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, fd name) from an /api/v1/owners document; ShapeError when a field
    is missing or not what it should be. Names are not taken: check reads its own."""
    claims: dict[int, tuple[int, str]] = {}
    items = Shape(document).field("owners")
    for item in items.items():
        inode, pid, fd = (item.field(key).integer() for key in ("inode", "pid", "fd"))
        if inode <= 0 or pid <= 0 or fd < 0:
            raise item.fail("a positive inode and pid and a descriptor number")
        claims[inode] = (pid, str(fd))
    return claims


def http_get(host: str, port: int, path: str, seconds: float) -> bytes:
    """The body of a 200 answer to GET ``path`` at ``host``:``port``, all within ``seconds`` and
    MAX_ANSWER_BYTES; AnswerError otherwise (OSError for the network's own errors)."""
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, port), timeout=seconds) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AnswerError(f"no complete answer within {seconds * 1000:.0f} ms")
            sock.settimeout(left)
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise AnswerError(f"an answer over {MAX_ANSWER_BYTES >> 20} MiB")
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"200":
        return_code = status[1][:3].decode("ascii", "replace") if len(status) > 1 else "nothing"
        raise AnswerError(f"it answered {return_code}, not 200")
    headers = dict(line.partition(b":")[::2] for line in lines[1:])
    fields = {name.strip().lower(): value.strip() for name, value in headers.items()}
    if b"transfer-encoding" in fields:
        raise AnswerError("a chunked answer")  # serve never sends one: not this daemon
    length = fields.get(b"content-length")
    if length is None or not length.isdigit() or int(length) != len(body):
        raise AnswerError("an answer cut short")
    return body


def owner_hints(config: Config) -> OwnerHints | None:
    """The local daemon's owners for this check; None when it looks for no owners."""
    collect = config.collect
    if not collect.process_attribution or "processes" in collect.disabled_sources:
        return None
    return ask_local_daemon(config)


def ask_local_daemon(config: Config, seconds: float = ASK_SECONDS) -> OwnerHints:
    """The local daemon's owners as hints for the poll, when it is there and verified."""
    url = local_daemon_url(config.listen)
    host, _, port_text = url.removeprefix("http://").rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return OwnerHints(None, OwnersOrigin(note=f"{url}: not a port to ask"))
    port = int(port_text)
    paths = ProcPaths(root=config.procfs, rootfs=config.rootfs)
    listening = listening_at(url, host, port, paths)
    if not listening.verdict.trusted:
        return OwnerHints(None, OwnersOrigin(note=listening.verdict.detail))
    try:
        claims = parse_owners(parse_bounded(http_get(host, port, PATH, seconds)))
    except (OSError, AnswerError, ShapeError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        if isinstance(error, TimeoutError):
            why = f"no answer within {seconds * 1000:.0f} ms"
        return OwnerHints(None, OwnersOrigin(note=f"the daemon at {url} did not tell: {why}"))
    verdict = verify_claimed(listening, paths, claims)
    if not verdict.trusted:
        return OwnerHints(None, OwnersOrigin(note=verdict.detail))
    known = Attribution(owners={}, processes_scanned=0, complete=False, locations=claims)
    return OwnerHints(known, OwnersOrigin(f"{url} ({verdict.detail})", len(claims)))
