"""Reading a running `tcpwatch serve` over its JSON API (docs/api.md), for `check --from` and
`top --from`.

The URL may carry basic-auth credentials (``https://user:password@host:9477``); HTTPS verifies
the server against the system's CA store, or the file ``SSL_CERT_FILE`` names. Every failure is
a :class:`DaemonError` whose message is one line saying what is wrong and what to do.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tcpwatch.errors import UsageError
from tcpwatch.escape import terminal
from tcpwatch.model import Snapshot, SourceStatus
from tcpwatch.render.json import findings_from_document
from tcpwatch.rules import Finding

MAX_BODY_BYTES = 64 * 1024 * 1024  # far above any capped answer; a runaway server is cut off


class DaemonError(UsageError):
    """The daemon could not be read: unreachable, refused us, or answered something else."""


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
        """GET path (with ``query``) and parse the JSON answer."""
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
            first = body.decode("utf-8", "replace").strip().splitlines()[:1]
            detail = terminal(first[0][:200]) if first else ""
            raise DaemonError(
                f"{where} answered {status} {reason} for {path}"
                + (f": {detail}" if detail else "")
                + ("" if status < 500 else " (see its log)")
            )
        try:
            return json.loads(body)
        except ValueError as error:
            raise DaemonError(
                f"{where} answered {path} with something that is not JSON ({error}): "
                "is this a tcpwatch serve, version 0.x with /api/v1?"
            ) from None

    def _get(self, target: str, timeout: float) -> tuple[int, str, bytes]:
        connection: http.client.HTTPConnection
        if self.scheme == "https":
            connection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            body = response.read(MAX_BODY_BYTES + 1)
            return response.status, response.reason, body[:MAX_BODY_BYTES]
        except ssl.SSLError as error:
            raise DaemonError(
                f"TLS with tcpwatch at {self.shown} failed: {error.reason or error}; "
                "point SSL_CERT_FILE at the CA that signed its certificate"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            text = error.strerror if isinstance(error, OSError) and error.strerror else error
            if isinstance(error, socket.timeout):
                text = f"no answer within {timeout:g} s"
            raise DaemonError(
                f"cannot reach tcpwatch at {self.shown}: {text or type(error).__name__} "
                "(is `tcpwatch serve` running there, and is the URL right?)"
            ) from None
        finally:
            connection.close()


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


def local_daemon_url(listen: str) -> str:
    """Where the local daemon answers, from its listen address (``:9477`` -> loopback)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port or 9477}"


def report_from_document(daemon: Daemon, document: Any) -> tuple[list[Finding], list[Snapshot]]:
    """The findings of a /api/v1/findings document, and bare snapshots (name, time, sources)
    for the text report's header; DaemonError when the document is not a check report."""
    try:
        findings = findings_from_document(document)
        sources: dict[str, list[SourceStatus]] = {}
        for item in document["sources"]:
            sources.setdefault(item["netns"], []).append(
                SourceStatus(
                    item["name"],
                    item["ok"],
                    item["duration_seconds"],
                    item["error"],
                    tuple(item.get("skipped", ())),  # absent from daemons before 12 item 8
                )
            )
        snapshots = [
            Snapshot(
                netns=item["netns"],
                taken_at=item["taken_at"],
                sockets=None,
                counters=None,
                sockstat=None,
                sysctls=None,
                attribution=None,
                sources=tuple(sources.get(item["netns"], ())),
            )
            for item in document["namespaces"]
        ]
        int(document["exit_code"])
    except (KeyError, TypeError, ValueError) as error:
        raise DaemonError(
            f"tcpwatch at {daemon.shown} answered /api/v1/findings with an unexpected document "
            f"({type(error).__name__}: {error}); is it the same tcpwatch version?"
        ) from None
    return findings, snapshots
