"""The routes of `tcpwatch serve`: /metrics, a landing page, /-/healthy and /-/ready.

A scrape renders the latest ExportState the poll loop published and never polls. The tcpwatch
part of the exposition depends only on that state, so it is rendered once per poll and reused
by every scrape until the next one; only the process_* self-metrics are rendered per scrape.

:class:`WebApp` is a plain object that turns a request (method, target, headers) into a
:class:`Response`, so routing, authentication and rendering are tested without sockets;
tcpwatch.http.server puts it on a listening socket.
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from tcpwatch.config import Config
from tcpwatch.http.auth import BasicAuth, TokenBucket
from tcpwatch.http.webconfig import WebConfig
from tcpwatch.render import api
from tcpwatch.render.html import landing_page
from tcpwatch.render.prometheus import make_registry
from tcpwatch.state import ExportState

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
            return text_response(HTTPStatus.TOO_MANY_REQUESTS, "Too many requests")
        if not policy.auth.check(headers.get("authorization")):
            return text_response(
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
        routes["/api/v1/snapshot"] = lambda: self._api(target, self._snapshot_json)
        routes["/api/v1/findings"] = lambda: self._api(target, self._findings_json)
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

    @staticmethod
    def _findings_json(state: ExportState, query: dict[str, str]) -> object:
        return api.findings_document(state, query.get("netns") or None, api.findings_limit(query))
