"""The HTTP side of `tcpwatch serve`: /metrics, a landing page, /-/healthy and /-/ready.

A scrape renders the latest ExportState the poll loop published and never polls. The tcpwatch
part of the exposition depends only on that state, so it is rendered once per poll and reused
by every scrape until the next one; only the process_* self-metrics are rendered per scrape.

Routing, authentication and rendering live in :class:`WebApp`, a plain object that turns a
request (method, target, headers) into a :class:`Response`, so they are tested without sockets;
:class:`WebServer` puts it on a listening socket (threads, TLS handshakes, timeouts).
"""

from __future__ import annotations

import base64
import binascii
import errno
import gzip
import hashlib
import html
import ipaddress
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import bcrypt
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from tcpwatch import __version__
from tcpwatch.config import Config
from tcpwatch.endpoints import endpoint
from tcpwatch.exporter import make_registry
from tcpwatch.state import ExportState
from tcpwatch.validation import MAX_SHOWN_CHARS, one_line
from tcpwatch.webconfig import RateLimit, WebConfig, client_sans

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Parallel requests beyond this get a quick 503 instead of queueing behind slow ones, as
# node_exporter's --web.max-requests does; Prometheus servers scrape a host a few at a time.
MAX_PARALLEL_REQUESTS = 64
REQUEST_TIMEOUT_SECONDS = 10.0  # idle keep-alive, slow headers, slow TLS handshakes
_GZIP_MIN_BYTES = 1024  # smaller bodies grow when compressed
_AUTH_CACHE_ENTRIES = 256
# A valid hash of a password nobody has: unknown users cost one bcrypt check too, so response
# time does not tell which user names exist.
_DUMMY_HASH = b"$2b$10$lw0ElSBFrK0ECLDZmsaL7OY8mA0xAl4G5W0GTrYl1t3ubd8HHsRAK"


class ListenError(Exception):
    """The listen address is malformed, cannot be resolved, or cannot be bound: one line."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed ``[ADDRESS]:PORT``; ``host`` "" means every address (IPv6 and IPv4)."""

    host: str
    port: int

    def __str__(self) -> str:
        return endpoint(self.host, self.port)


def parse_listen(text: str) -> ListenAddress:
    """``:9477``, ``127.0.0.1:9477``, ``[::1]:9477``, ``localhost:9477`` -> ListenAddress.

    Raises ListenError naming the text and what is wrong with it, in one bounded line: the port
    is 1-5 ASCII digits, a bracketed host an IPv6 address, any other host an IPv4 address or a
    host name that resolves can take (labels of 1-63 characters, 253 in all, valid IDNA).
    """
    shown = f'listen address "{one_line(text, MAX_SHOWN_CHARS)}"'
    hint = 'expected [ADDRESS]:PORT, e.g. ":9477", "127.0.0.1:9477" or "[::1]:9477"'
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":") or not host:
            raise ListenError(f"{shown}: {hint}")
        port_text = rest[1:]
        problem = _ipv6_problem(host)
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ListenError(f"{shown}: {hint}")
        if ":" in host:
            raise ListenError(f"{shown}: put an IPv6 address in brackets: {hint}")
        problem = _host_problem(host) if host else None
    # ASCII digits only: str.isdigit() also takes "²", and int() reads "٣" as 3.
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ListenError(
            f'{shown}: port must be a number 0-65535, got "{one_line(port_text, 20)}"'
        )
    if problem is not None:
        raise ListenError(f"{shown}: {problem}")
    return ListenAddress(host, int(port_text))


_PORT = re.compile(r"[0-9]{1,5}")
# What getaddrinfo() takes in a host name label once IDNA-encoded (underscores for /etc/hosts).
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def _ipv6_problem(host: str) -> str | None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f'"{one_line(host, MAX_SHOWN_CHARS)}" in brackets is not an IPv6 address'
    return None


def _host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IPv4 address nor a valid host name, or None."""
    try:
        ipaddress.IPv4Address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host  # a fully qualified "example.net."
    if len(name) > 253:
        return f"a host name is at most 253 characters, this one has {len(name)}"
    for label in name.split("."):
        if not label:
            return "a host name has an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"a host name label is at most 63 characters, one has {len(label)}"
    try:
        # The codec getaddrinfo() applies to a str host: its errors would be a traceback there.
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError as error:
        reason = one_line(str(error), MAX_SHOWN_CHARS)
        return f"not a valid host name ({reason})"
    for label in encoded.split("."):
        if len(label) > 63 or not _LABEL.fullmatch(label):
            shown = one_line(label, MAX_SHOWN_CHARS)
            return (
                f'not a valid host name: label "{shown}" (letters, digits and inner "-", '
                "1-63 characters each)"
            )
    if len(encoded) > 253:
        return f"a host name is at most 253 characters once encoded, this one has {len(encoded)}"
    return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: HTTPStatus, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, "text/plain; charset=utf-8", (message + "\n").encode(), headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (``gzip``, ``gzip;q=0.5``; not ``gzip;q=0``)."""
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() not in ("gzip", "x-gzip"):
            continue
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


class BasicAuth:
    """Checks HTTP basic credentials against bcrypt hashes, remembering successes.

    bcrypt is slow on purpose (about 0.1 s at cost 10 here), so a successful check is cached,
    as exporter-toolkit does, keyed by a digest of user, password and hash (a changed hash never
    matches an old entry). Checks run one at a time so a flood of wrong passwords costs one core.
    """

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {user: hashed.encode() for user, hashed in users.items()}
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, authorization: str | None) -> bool:
        if not self._users:
            return True
        credentials = _decode_basic(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        if hashed is not None and key in self._verified:
            return True
        with self._lock:
            try:
                ok = bcrypt.checkpw(password, hashed or _DUMMY_HASH) and hashed is not None
            except ValueError:  # longer than bcrypt's 72 bytes: no stored hash can match
                ok = False
            if ok:
                if len(self._verified) >= _AUTH_CACHE_ENTRIES:
                    self._verified.clear()
                self._verified.add(key)
        return ok


def _decode_basic(authorization: str | None) -> tuple[str, bytes] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class TokenBucket:
    """exporter-toolkit's rate_limit: up to ``burst`` requests at once, refilled one token per
    ``interval_seconds``."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            refill = (now - self._updated) / self._limit.interval_seconds
            self._tokens = min(float(self._limit.burst), self._tokens + refill)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


@dataclass(frozen=True, slots=True)
class _Policy:
    """What the web config decides, swapped whole on reload."""

    web: WebConfig
    auth: BasicAuth
    limiter: TokenBucket | None


@dataclass(frozen=True, slots=True)
class Health:
    """The daemon's answer for /-/healthy: None = healthy, else why not."""

    problem: str | None = None


class WebApp:
    """Routes requests to /metrics, /, /-/healthy and /-/ready.

    ``state`` returns the latest ExportState (None until the first poll ended), ``config`` the
    running Config, ``health`` the poll loop's health; all are cheap reference reads.
    """

    def __init__(
        self,
        state: Callable[[], ExportState | None],
        config: Callable[[], Config],
        health: Callable[[], Health],
        web_config: WebConfig | None = None,
        include_process_metrics: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self._config = config
        self._health = health
        self._clock = clock
        self._policy = self._make_policy(web_config or WebConfig())
        # (state, its rendering): one tuple, replaced whole, so readers never see a mismatch.
        self._rendered: tuple[ExportState | None, bytes] | None = None
        self._self_metrics = CollectorRegistry(auto_describe=False)
        if include_process_metrics:
            ProcessCollector(registry=self._self_metrics)
            PlatformCollector(registry=self._self_metrics)
        self.listening_on = ""  # set by WebServer once bound, for the landing page

    @staticmethod
    def _make_policy(web: WebConfig) -> _Policy:
        limiter = TokenBucket(web.rate_limit) if web.rate_limit is not None else None
        return _Policy(web, BasicAuth(web.basic_auth_users), limiter)

    @property
    def web_config(self) -> WebConfig:
        return self._policy.web

    def set_web_config(self, web: WebConfig) -> None:
        """Take a new web config (on reload): TLS context, users and headers at once."""
        self._policy = self._make_policy(web)

    def respond(self, method: str, target: str, headers: Mapping[str, str]) -> Response:
        """Answer one request; ``headers`` has lower-case names."""
        policy = self._policy
        response = self._route(policy, method, target, headers)
        extra = tuple(policy.web.headers.items())
        return Response(
            response.status, response.content_type, response.body, response.headers + extra
        )

    def _route(
        self, policy: _Policy, method: str, target: str, headers: Mapping[str, str]
    ) -> Response:
        if policy.limiter is not None and not policy.limiter.take():
            return _text(HTTPStatus.TOO_MANY_REQUESTS, "Too many requests")
        if not policy.auth.check(headers.get("authorization")):
            return _text(
                HTTPStatus.UNAUTHORIZED,
                "Unauthorized",
                ("WWW-Authenticate", 'Basic realm="tcpwatch", charset="UTF-8"'),
            )
        path = target.partition("?")[0]
        routes: dict[str, Callable[[], Response]] = {
            "/metrics": self._metrics,
            "/": self._landing,
            "/-/healthy": self._healthy,
            "/-/ready": self._ready,
        }
        handler = routes.get(path)
        if handler is None:
            return _text(HTTPStatus.NOT_FOUND, f"Not found: {path} (try /metrics)")
        if method not in ("GET", "HEAD"):
            return _text(
                HTTPStatus.METHOD_NOT_ALLOWED, "Method not allowed", ("Allow", "GET, HEAD")
            )
        response = handler()
        if (
            accepts_gzip(headers.get("accept-encoding", ""))
            and len(response.body) >= _GZIP_MIN_BYTES
        ):
            return Response(
                response.status,
                response.content_type,
                gzip.compress(response.body, compresslevel=6),
                (*response.headers, ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")),
            )
        return response

    def render_metrics(self) -> bytes:
        """The exposition: tcpwatch's families (rendered once per poll) + process self-metrics."""
        state = self._state()
        rendered = self._rendered
        if rendered is None or rendered[0] is not state:
            # Two scrapes racing here both render the same state; either result is right.
            rendered = (state, generate_latest(make_registry(lambda: state, include_process=False)))
            self._rendered = rendered
        return rendered[1] + generate_latest(self._self_metrics)

    def _metrics(self) -> Response:
        return Response(HTTPStatus.OK, METRICS_CONTENT_TYPE, self.render_metrics())

    def _healthy(self) -> Response:
        problem = self._health().problem
        if problem is not None:
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, f"Unhealthy: {problem}")
        return _text(HTTPStatus.OK, "Healthy")

    def _ready(self) -> Response:
        if self._state() is None:
            return _text(
                HTTPStatus.SERVICE_UNAVAILABLE, "Not ready: the first poll has not finished"
            )
        return _text(HTTPStatus.OK, "Ready")

    def _landing(self) -> Response:
        body = landing_page(
            self._state(), self._config(), self._policy.web, self.listening_on, self._clock()
        )
        return Response(HTTPStatus.OK, "text/html; charset=utf-8", body.encode("utf-8"))


def landing_page(
    state: ExportState | None, config: Config, web: WebConfig, listening_on: str, now: float
) -> str:
    """The page at /: version, configuration, the latest poll, active findings, links."""
    e = html.escape
    collect = config.collect
    attribution = (
        f"on ({', '.join(collect.attribute_states) or 'listeners only'}; scan timeout "
        f"{collect.process_scan_timeout:g} s)"
        if collect.process_attribution
        else "off"
    )
    overrides = []
    for rule_id, override in sorted(config.rules.items()):
        if not override.enabled:
            overrides.append(f"{rule_id} disabled")
        for name, value in sorted(override.thresholds.items()):
            overrides.append(f"{rule_id}.{name} = {'unset' if value is None else f'{value:g}'}")
    settings = [
        ("Configuration file", config.source),
        ("Listening on", f"{listening_on or config.listen} ({web.summary()})"),
        ("Web config", config.web_config or "none"),
        ("Poll interval", f"{config.interval:g} s"),
        ("Namespaces", ", ".join(config.namespaces)),
        ("procfs", config.procfs),
        ("ESTABLISHED counted", collect.established),
        ("Process attribution", attribution),
        ("Top N", f"{collect.top_processes} processes, {collect.top_destinations} destinations"),
        ("Rule overrides", "; ".join(overrides) or "none (defaults)"),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in settings)
    if state is None:
        poll = "<p>The first poll has not finished yet.</p>"
        findings = ""
    else:
        age = max(now - state.last_poll, 0.0)
        failing = [
            f"{status.name} in {snap.netns}: {status.error}"
            for snap in state.snapshots
            for status in snap.sources
            if not status.ok
        ]
        sources = (
            "<ul>" + "".join(f"<li>{e(text)}</li>" for text in failing) + "</ul>"
            if failing
            else "<p>Every source worked.</p>"
        )
        poll = (
            f"<p>Latest poll {age:.0f} s ago, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(state.last_poll))}; "
            f"namespaces: {e(', '.join(s.netns for s in state.snapshots))}.</p>"
            f"<h3>Failing sources</h3>{sources}"
        )
        findings = _findings_html(state)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>tcpwatch</title>'
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}th,td{text-align:left;padding:.2em .8em;"
        "border-bottom:1px solid #ddd;vertical-align:top}pre{margin:0;white-space:pre-wrap}"
        ".critical{color:#b00}.warning{color:#a60}</style></head><body>"
        f"<h1>tcpwatch {e(__version__)}</h1>"
        "<p>TCP connection-health exporter. "
        '<a href="/metrics">Metrics</a> · <a href="/-/healthy">Health</a> · '
        '<a href="/-/ready">Readiness</a></p>'
        f"<h2>Configuration</h2><table>{rows}</table>"
        f"<h2>Poll</h2>{poll}{findings}</body></html>\n"
    )


def _findings_html(state: ExportState) -> str:
    e = html.escape
    if not state.findings:
        return "<h2>Findings</h2><p>No active findings: TCP looks healthy.</p>"
    rows = "".join(
        f'<tr><td class="{e(f.severity)}">{e(f.severity)}</td>'
        f"<td>{e(f.rule_id)} {e(f.slug)}</td><td>{e(f.netns)}</td><td>{e(f.subject)}</td>"
        f"<td>{e(f.title)}<details><summary>fix</summary><pre>{e(f.remediation)}</pre>"
        f"<p>{e(f.doc)}</p></details></td></tr>"
        for f in state.findings
    )
    return (
        f"<h2>Findings ({len(state.findings)})</h2><table><tr><th>Severity</th><th>Rule</th>"
        f"<th>Namespace</th><th>Subject</th><th>What</th></tr>{rows}</table>"
    )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its scrape connections
    # Buffered: headers and body leave in one send() (flushed after each request), not as two
    # small writes that Nagle and the client's delayed ACK would hold up by 40 ms.
    wbufsize = 1 << 16
    server_version = f"tcpwatch/{__version__}"
    timeout = REQUEST_TIMEOUT_SECONDS

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        if method not in ("GET", "HEAD"):
            self.close_connection = True  # a request body we will not read may follow
        slots = self.server.slots
        if not slots.acquire(blocking=False):
            self._send(method, _text(HTTPStatus.SERVICE_UNAVAILABLE, "Too many parallel requests"))
            return
        try:
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                response = self.server.app.respond(method, self.path, headers)
            except Exception:  # one broken request must not cost the server its thread pool
                log.exception("error answering %s %s", method, self.path)
                response = _text(HTTPStatus.INTERNAL_SERVER_ERROR, "Internal error (see the log)")
            self._send(method, response)
        finally:
            slots.release()

    def _send(self, method: str, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must never hold up shutdown
    request_queue_size = 128

    def __init__(
        self, family: socket.AddressFamily, address: tuple[Any, ...], dual_stack: bool, app: WebApp
    ) -> None:
        self.address_family = family
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_PARALLEL_REQUESTS)
        self._dual_stack = dual_stack
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: its getfqdn() can wait on DNS for many seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        # As Go's net/http does: a response's last partial segment goes out at once.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.app.web_config.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        tls = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            try:
                tls.do_handshake()
            except (OSError, ValueError) as error:
                log.debug("TLS handshake with %s failed: %s", client_address[0], error)
                return
            allowed = self.app.web_config.tls
            if allowed is not None and allowed.client_allowed_sans:
                sans = client_sans(tls.getpeercert())
                if not set(sans) & set(allowed.client_allowed_sans):
                    log.info(
                        "refused TLS client %s: no allowed SAN in its certificate (%s)",
                        client_address[0],
                        ", ".join(sans) or "none",
                    )
                    return
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and timeouts from clients are routine; never a traceback on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class WebServer:
    """The listening socket and its serving thread."""

    def __init__(self, listen: ListenAddress, app: WebApp) -> None:
        self._listen = listen
        self._server = _bind(listen, app)
        self._thread: threading.Thread | None = None
        host, port = self._server.server_address[:2]
        self.address = ListenAddress(str(host), int(port))
        app.listening_on = str(self.address)

    @property
    def url(self) -> str:
        scheme = "https" if self._server.app.web_config.ssl_context is not None else "http"
        host = self.address.host
        if host in ("::", "0.0.0.0"):
            host = "localhost"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.address.port}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()  # returns within poll_interval
            self._thread.join(timeout=1.0)
        self._server.server_close()


def _bind(listen: ListenAddress, app: WebApp) -> _Server:
    if listen.host == "":
        try:
            return _Server(socket.AF_INET6, ("::", listen.port), True, app)
        except OSError as error:
            if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise ListenError(_bind_failure(listen, error)) from None
        # No IPv6 in this kernel or namespace: every IPv4 address will do.
        return _try_bind(listen, socket.AF_INET, ("0.0.0.0", listen.port), app)
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(
            f'cannot listen on {listen}: cannot resolve "{listen.host}": {error.strerror}'
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return _try_bind(listen, family, sockaddr, app)


def _try_bind(
    listen: ListenAddress, family: socket.AddressFamily, address: tuple[Any, ...], app: WebApp
) -> _Server:
    try:
        return _Server(family, address, False, app)
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
