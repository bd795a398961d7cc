"""The routes of `tcpwatch serve`: /metrics, a landing page, /-/healthy and /-/ready.

A scrape renders the latest ExportState the poll loop published and never polls. The tcpwatch
part of the exposition depends only on that state, so it is rendered once per poll (and format)
and reused by every scrape until the next one; only the process_* self-metrics are rendered per
scrape. /metrics negotiates as prometheus-client's own handler does: OpenMetrics when `Accept`
asks for application/openmetrics-text (Prometheus does), the text format otherwise, and
`?name[]=a&name[]=b` keeps only the samples so named.

:class:`WebApp` is a plain object that turns a request (method, target, headers) into a
:class:`Response`, so routing, authentication and rendering are tested without sockets;
tcpwatch.http.server puts it on a listening socket.
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tcpwatch.config import Config
from tcpwatch.http.auth import AuthResult, BasicAuth, BcryptGate, FailureLimiter, TokenBucket
from tcpwatch.http.webconfig import WebConfig
from tcpwatch.render import api
from tcpwatch.render.html import landing_page
from tcpwatch.render.prometheus import make_registry
from tcpwatch.render.rulepage import rule_page_html
from tcpwatch.state import ExportState

_OPENMETRICS_EOF = b"# EOF\n"
_GZIP_MIN_BYTES = 1024  # smaller bodies grow when compressed


@dataclass(frozen=True, slots=True)
class Response:
    """One answer; the server adds Content-Length and writes it."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def text_response(status: HTTPStatus, message: str, *headers: tuple[str, str]) -> Response:
    """A one-line plain-text answer: errors, health, readiness."""
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


class _Collected(Collector):
    """Families collected once, described by name: a restricted registry (``name[]``) finds
    collectors by the names they describe."""

    def __init__(self, families: tuple[Metric, ...]) -> None:
        self._families = families

    def describe(self) -> list[Metric]:
        return list(self._families)

    def collect(self) -> list[Metric]:
        return list(self._families)


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
        # Kept across reloads: a reload must not hand a flooding client a fresh budget.
        self._failures = FailureLimiter()
        self._bcrypt = BcryptGate()
        self._policy = self._make_policy(web_config or WebConfig())
        # (state, {content type: its rendering}): one tuple, replaced whole, so readers never
        # see a rendering of another state.
        self._rendered: tuple[ExportState | None, Mapping[str, bytes]] = (None, {})
        self._self_metrics = CollectorRegistry(auto_describe=False)
        if include_process_metrics:
            ProcessCollector(registry=self._self_metrics)
            PlatformCollector(registry=self._self_metrics)
        self.listening_on = ""  # set by WebServer once bound, for the landing page

    def _make_policy(self, web: WebConfig) -> _Policy:
        limiter = TokenBucket(web.rate_limit) if web.rate_limit is not None else None
        auth = BasicAuth(web.basic_auth_users, self._failures, self._bcrypt)
        return _Policy(web, auth, limiter)

    @property
    def web_config(self) -> WebConfig:
        return self._policy.web

    def set_web_config(self, web: WebConfig) -> None:
        """Take a new web config (on reload): TLS context, users and headers at once."""
        self._policy = self._make_policy(web)

    def triage(self, headers: Mapping[str, str], client: str) -> tuple[bool, Response | None]:
        """Before a request takes a worker: (trusted, an answer now). Trusted requests carry
        credentials verified before and go ahead of the rest; an address out of failure budget
        gets its 429 at once, so a flood of wrong passwords never fills the workers' queue."""
        result = self._policy.auth.triage(headers.get("authorization"), client)
        if result is AuthResult.THROTTLED:
            return False, _refusal(result)
        return result is AuthResult.OK, None

    def respond(
        self, method: str, target: str, headers: Mapping[str, str], client: str = ""
    ) -> Response:
        """Answer one request; ``headers`` has lower-case names, ``client`` is its address."""
        policy = self._policy
        response = self._route(policy, method, target, headers, client)
        extra = tuple(policy.web.headers.items())
        return Response(
            response.status, response.content_type, response.body, response.headers + extra
        )

    def _route(
        self, policy: _Policy, method: str, target: str, headers: Mapping[str, str], client: str
    ) -> Response:
        if policy.limiter is not None and not policy.limiter.take():
            return text_response(HTTPStatus.TOO_MANY_REQUESTS, "Too many requests")
        refused = _refusal(policy.auth.verify(headers.get("authorization"), client))
        if refused is not None:
            return refused
        path, _, query = target.partition("?")
        routes: dict[str, Callable[[], Response]] = {
            "/metrics": lambda: self._metrics(headers.get("accept", ""), query),
            "/": self._landing,
            "/-/healthy": self._healthy,
            "/-/ready": self._ready,
        }
        routes["/api/v1/snapshot"] = lambda: self._api(target, self._snapshot_json)
        routes["/api/v1/findings"] = lambda: self._api(target, self._findings_json)
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
            and len(response.body) >= _GZIP_MIN_BYTES
        ):
            return Response(
                response.status,
                response.content_type,
                gzip.compress(response.body, compresslevel=6),
                (*response.headers, ("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")),
            )
        return response

    def render_metrics(self, accept: str = "", names: Sequence[str] = ()) -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for, and its content type: tcpwatch's
        families (rendered once per poll and format) + process self-metrics; with ``names``,
        only the samples so named (prometheus-client's restricted registry)."""
        encoder, content_type = choose_encoder(accept)
        state = self._state()
        if names:
            families = [*make_registry(lambda: state, include_process=False).collect()]
            registry = CollectorRegistry()
            registry.register(_Collected((*families, *self._self_metrics.collect())))
            return encoder(registry.restricted_registry(names)), content_type
        rendered_state, renderings = self._rendered
        body = renderings.get(content_type) if rendered_state is state else None
        if body is None:
            # Two scrapes racing here both render the same state; either result is right.
            body = encoder(make_registry(lambda: state, include_process=False))
            # OpenMetrics ends with one "# EOF", which the self-metrics bring.
            body = body.removesuffix(_OPENMETRICS_EOF)
            known = renderings if rendered_state is state else {}
            self._rendered = (state, {**known, content_type: body})
        return body + encoder(self._self_metrics), content_type

    def _metrics(self, accept: str, query: str) -> Response:
        names = parse_qs(query).get("name[]", [])
        body, content_type = self.render_metrics(accept, names)
        return Response(HTTPStatus.OK, content_type, body, (("Vary", "Accept"),))

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
        return Response(HTTPStatus.OK, "text/html; charset=utf-8", body.encode("utf-8"))

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
            body,
            (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")),
        )

    @staticmethod
    def _snapshot_json(state: ExportState, query: dict[str, str]) -> object:
        return api.snapshot_document(state, api.snapshot_query(query))

    def _findings_json(self, state: ExportState, query: dict[str, str]) -> object:
        netns, limit = query.get("netns") or None, api.findings_limit(query)
        return api.findings_document(state, netns, limit, self._config().docs_url)

    def _rule_page(self, name: str) -> Response:
        page = rule_page_html(name, self._config().docs_url)
        if page is None:
            return text_response(HTTPStatus.NOT_FOUND, f"No rule {name[:40]!r} (try /rules/)")
        return Response(HTTPStatus.OK, "text/html; charset=utf-8", page.encode("utf-8"))
