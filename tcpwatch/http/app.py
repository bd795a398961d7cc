"""The routes of `tcpwatch serve`: /metrics, a landing page, /-/healthy and /-/ready.

A scrape renders the latest ExportState the poll loop published and never polls; the bytes of
the tcpwatch families are rendered once per poll and format and shared by every scrape until
the next one (tcpwatch.http.exposition: format negotiation, `?name[]=` filtering, gzip); only
the process_* self-metrics are rendered per scrape.

:class:`WebApp` is a plain object that turns a request (method, target, headers) into a
:class:`Response`, so routing, authentication and rendering are tested without sockets;
tcpwatch.http.server puts it on a listening socket, and asks :meth:`WebApp.triage` first, so a
request whose password needs bcrypt waits for it without a worker thread.
"""

from __future__ import annotations

import gzip
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from tcpwatch.config import Config
from tcpwatch.http.auth import (
    AuthResult,
    BasicAuth,
    FailureLimiter,
    Pending,
    TokenBucket,
    Verdict,
    VerifiedCache,
)
from tcpwatch.http.checks import CheckLine
from tcpwatch.http.exposition import Chunk, Expositions, negotiate
from tcpwatch.http.webconfig import WebConfig
from tcpwatch.render import api
from tcpwatch.render.html import landing_page
from tcpwatch.render.memo import FamilyMemo
from tcpwatch.render.rulepage import rule_page_html
from tcpwatch.state import ExportState

_GZIP_MIN_BYTES = 1024  # smaller bodies grow when compressed


@dataclass(frozen=True, slots=True)
class Response:
    """One answer; the server adds Content-Length and writes it. ``parts`` are written in order
    and may be shared with other responses (the cached exposition), so they are never copied."""

    status: int
    content_type: str
    parts: tuple[Chunk, ...]
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)

    @property
    def length(self) -> int:
        return sum(len(part) for part in self.parts)


def text_response(status: HTTPStatus, message: str, *headers: tuple[str, str]) -> Response:
    """A one-line plain-text answer: errors, health, readiness."""
    return Response(status, "text/plain; charset=utf-8", ((message + "\n").encode(),), headers)


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


def _refusal(result: AuthResult) -> Response | None:
    if result is AuthResult.DENIED:
        return text_response(
            HTTPStatus.UNAUTHORIZED,
            "Unauthorized",
            ("WWW-Authenticate", 'Basic realm="tcpwatch", charset="UTF-8"'),
        )
    if result is AuthResult.THROTTLED:
        return text_response(
            HTTPStatus.TOO_MANY_REQUESTS,
            "Too many failed logins from your address; wait a minute",
            ("Retry-After", "60"),
        )
    if result is AuthResult.BUSY:
        return text_response(
            HTTPStatus.SERVICE_UNAVAILABLE, "Busy checking passwords", ("Retry-After", "1")
        )
    return None


@dataclass(frozen=True, slots=True)
class Admission:
    """What a connection is let in under: TLS or not, and which client certificates. A reload
    that changes it raises ``generation``; connections admitted under an older one are closed."""

    generation: int
    ssl_context: ssl.SSLContext | None
    client_allowed_sans: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Triage:
    """Before a request takes a worker: trusted (credentials verified before: it goes first),
    a verdict reached without bcrypt, or a check it must wait for (``pending``)."""

    trusted: bool = False
    verdict: Verdict | None = None
    pending: Pending | None = None


@dataclass(frozen=True, slots=True)
class _Policy:
    """What the web config decides, swapped whole on reload."""

    web: WebConfig
    auth: BasicAuth
    limiter: TokenBucket | None
    admission: Admission


@dataclass(frozen=True, slots=True)
class Health:
    """The daemon's answer for /-/healthy: None = healthy, else why not."""

    problem: str | None = None


def _admits(web: WebConfig) -> tuple[object, ...]:
    """What decides which connections a web config lets in (compared across reloads)."""
    return (web.tls, web.client_ca_digest)


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
        # Kept across reloads: a reload must neither hand a flooding client a fresh budget nor
        # make a scraper whose hash did not change prove its password again.
        self._failures = FailureLimiter()
        self._line = CheckLine()
        self._verified = VerifiedCache()
        self._policy = self._make_policy(web_config or WebConfig(), 0)
        self._on_reload: list[Callable[[], None]] = []  # servers to wake (WebServer)
        self._self_metrics = CollectorRegistry(auto_describe=False)
        if include_process_metrics:
            ProcessCollector(registry=self._self_metrics)
            PlatformCollector(registry=self._self_metrics)
        # Each family reused from the last poll's state while what it read is unchanged.
        self._expositions = Expositions(FamilyMemo().collect, self._self_metrics)
        self.listening_on = ""  # set by WebServer once bound, for the landing page

    def _make_policy(self, web: WebConfig, generation: int) -> _Policy:
        limiter = TokenBucket(web.rate_limit) if web.rate_limit is not None else None
        auth = BasicAuth(web.basic_auth_users, self._failures, self._line, self._verified)
        sans = web.tls.client_allowed_sans if web.tls is not None else ()
        return _Policy(web, auth, limiter, Admission(generation, web.ssl_context, sans))

    @property
    def web_config(self) -> WebConfig:
        return self._policy.web

    @property
    def admission(self) -> Admission:
        return self._policy.admission

    def set_web_config(self, web: WebConfig) -> None:
        """Take a new web config (on reload): TLS context, users and headers at once."""
        old = self._policy
        generation = old.admission.generation + (_admits(web) != _admits(old.web))
        self._policy = self._make_policy(web, generation)
        for wake in self._on_reload:  # a sleeping server applies the new policy now
            wake()

    def on_reload(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after each set_web_config (the server sleeps while idle)."""
        self._on_reload.append(wake)

    def triage(
        self,
        headers: Mapping[str, str],
        client: str,
        on_checked: Callable[[Pending], None] | None = None,
    ) -> Triage:
        """Cheap (a hash and a lookup): verified credentials are trusted, a missing one is
        denied, and a password bcrypt must check is queued, ``on_checked`` told when done."""
        policy = self._policy
        started = policy.auth.begin(headers.get("authorization"), client, on_checked)
        if isinstance(started, Pending):
            return Triage(pending=started)
        trusted = policy.auth.enabled and started.result is AuthResult.OK
        return Triage(trusted, started)

    def cancel(self, pending: Pending) -> None:
        """The client of a waiting check went away."""
        self._policy.auth.cancel(pending)

    def expire_checks(self) -> None:
        """End the password checks that waited too long (the server calls it often)."""
        self._line.expire()

    def checks_pending(self) -> bool:
        """Password checks wait in line (the server then keeps its short tick)."""
        return self._line.waiting() > 0

    def respond(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        client: str = "",
        verdict: Verdict | None = None,
    ) -> Response:
        """Answer one request; ``headers`` has lower-case names, ``client`` is its address.
        ``verdict`` is what triage or a check decided; without one, the credentials are checked
        here (waiting for bcrypt if need be)."""
        policy = self._policy
        response = self._route(policy, method, target, headers, client, verdict)
        extra = tuple(policy.web.headers.items())
        return Response(
            response.status, response.content_type, response.parts, response.headers + extra
        )

    def _authorize(
        self, policy: _Policy, headers: Mapping[str, str], client: str, verdict: Verdict | None
    ) -> AuthResult:
        if verdict is None:
            return policy.auth.verify(headers.get("authorization"), client)
        if policy.auth.holds(verdict):
            return verdict.result
        # Decided under a web config a reload replaced, for a hash that changed: decide again,
        # without holding this worker for bcrypt.
        again = policy.auth.begin(headers.get("authorization"), client)
        if isinstance(again, Pending):
            policy.auth.cancel(again)
            return AuthResult.BUSY
        return again.result

    def _route(
        self,
        policy: _Policy,
        method: str,
        target: str,
        headers: Mapping[str, str],
        client: str,
        verdict: Verdict | None,
    ) -> Response:
        if policy.limiter is not None and not policy.limiter.take():
            return text_response(HTTPStatus.TOO_MANY_REQUESTS, "Too many requests")
        refused = _refusal(self._authorize(policy, headers, client, verdict))
        if refused is not None:
            return refused
        path, _, query = target.partition("?")
        routes: dict[str, Callable[[], Response]] = {
            "/metrics": lambda: self._metrics(headers, query),
            "/": self._landing,
            "/-/healthy": self._healthy,
            "/-/ready": self._ready,
        }
        routes["/api/v1/snapshot"] = lambda: self._api(target, self._snapshot_json)
        routes["/api/v1/findings"] = lambda: self._api(target, self._findings_json)
        routes["/api/v1/owners"] = lambda: self._api(target, self._owners_json)
        if path.startswith(api.RULE_PAGES):  # /rules/ and /rules/Q01: the rule pages
            routes[path] = lambda: self._rule_page(path.removeprefix(api.RULE_PAGES))
        handler = routes.get(path)
        if handler is None:
            return text_response(HTTPStatus.NOT_FOUND, f"Not found: {path} (try /metrics)")
        if method not in ("GET", "HEAD"):
            return text_response(
                HTTPStatus.METHOD_NOT_ALLOWED, "Method not allowed", ("Allow", "GET, HEAD")
            )
        response = handler()
        if (
            accepts_gzip(headers.get("accept-encoding", ""))
            and response.length >= _GZIP_MIN_BYTES
            and not any(name == "Content-Encoding" for name, _ in response.headers)
        ):
            return Response(
                response.status,
                response.content_type,
                (gzip.compress(response.body, compresslevel=6),),
                (*response.headers, ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")),
            )
        return response

    def _metrics(self, headers: Mapping[str, str], query: str) -> Response:
        fmt = negotiate(headers.get("accept", ""))
        names = parse_qs(query).get("name[]", [])
        zipped = accepts_gzip(headers.get("accept-encoding", ""))
        parts = self._expositions.render(self._state(), fmt, names, zipped)
        extra = (("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")) if zipped else ()
        return Response(HTTPStatus.OK, fmt.content_type, parts, (("Vary", "Accept"), *extra))

    def _healthy(self) -> Response:
        problem = self._health().problem
        if problem is not None:
            return text_response(HTTPStatus.SERVICE_UNAVAILABLE, f"Unhealthy: {problem}")
        return text_response(HTTPStatus.OK, "Healthy")

    def _ready(self) -> Response:
        if self._state() is None:
            return text_response(
                HTTPStatus.SERVICE_UNAVAILABLE, "Not ready: the first poll has not finished"
            )
        return text_response(HTTPStatus.OK, "Ready")

    def _landing(self) -> Response:
        body = landing_page(
            self._state(),
            self._config(),
            self.listening_on,
            self._policy.web.summary(),
            self._clock(),
        )
        return Response(HTTPStatus.OK, "text/html; charset=utf-8", (body.encode("utf-8"),))

    # -- the JSON API (docs/api.md): same auth, TLS and rate limit as /metrics -------------------

    def _api(
        self, target: str, render: Callable[[ExportState, dict[str, str]], object]
    ) -> Response:
        state = self._state()
        if state is None:
            return text_response(
                HTTPStatus.SERVICE_UNAVAILABLE, "Not ready: the first poll has not finished"
            )
        try:
            pairs = urllib.parse.parse_qsl(target.partition("?")[2], max_num_fields=10)
            document = render(state, dict(pairs))
        except ValueError as error:  # api.QueryError, or too many fields
            return text_response(HTTPStatus.BAD_REQUEST, f"Bad request: {error}")
        body = json.dumps(document, separators=(",", ":")).encode()
        return Response(
            HTTPStatus.OK,
            "application/json",
            (body,),
            (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")),
        )

    @staticmethod
    def _snapshot_json(state: ExportState, query: dict[str, str]) -> object:
        return api.snapshot_document(state, api.snapshot_query(query))

    def _findings_json(self, state: ExportState, query: dict[str, str]) -> object:
        netns, limit = query.get("netns") or None, api.findings_limit(query)
        return api.findings_document(state, netns, limit, self._config().docs_url)

    @staticmethod
    def _owners_json(state: ExportState, query: dict[str, str]) -> object:
        return api.owners_document(state, *api.owners_query(query))

    def _rule_page(self, name: str) -> Response:
        page = rule_page_html(name, self._config().docs_url)
        if page is None:
            return text_response(HTTPStatus.NOT_FOUND, f"No rule {name[:40]!r} (try /rules/)")
        return Response(HTTPStatus.OK, "text/html; charset=utf-8", (page.encode("utf-8"),))
