"""The HTTP side: routing, readiness, health, gzip, basic auth, rate limits, the landing page,
listen-address parsing and binding. WebApp is driven directly; a few tests go over real
loopback sockets to check what only a socket shows (HEAD, keep-alive, overload, dual stack).
"""

from __future__ import annotations

import base64
import gzip
import http.client
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import bcrypt
import pytest
from prometheus_client.core import Metric

from tcpwatch import __version__
from tcpwatch.config import CollectSettings, Config, RuleOverride
from tcpwatch.http import app as web_app
from tcpwatch.http import server as web_server
from tcpwatch.http.app import Health, Response, WebApp, accepts_gzip
from tcpwatch.http.auth import AuthResult, BasicAuth, TokenBucket
from tcpwatch.http.listen import ListenAddress, ListenError, parse_listen
from tcpwatch.http.server import WebServer
from tcpwatch.http.webconfig import RateLimit, WebConfig
from tcpwatch.model import ProcessRef
from tcpwatch.rules import Finding
from tcpwatch.state import ExportState

from .test_daemon import make_snapshot

# Cost 4: the cheapest bcrypt, so the tests do not spend 0.1 s per check.
PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def finding(title: str = "accept queue full on 0.0.0.0:80 (nginx[12])") -> Finding:
    return Finding(
        rule_id="Q01",
        slug="accept-queue-full",
        severity="critical",
        title=title,
        netns="host",
        subject="0.0.0.0:80",
        evidence=MappingProxyType({"queue": 129}),
        remediation="sysctl -w net.core.somaxconn=4096",
        doc="docs/rules/Q01-accept-queue-full.md",
    )


def export_state(*findings: Finding, last_poll: float = 1_700_000_000.0) -> ExportState:
    snapshot = make_snapshot(close_wait=[1, 2], owner=ProcessRef(7, "leaky"), failing=["sysctl"])
    return ExportState(snapshots=(snapshot,), findings=findings, last_poll=last_poll, cached=True)


class Holder:
    """What the daemon gives WebApp: the latest state, the config and health, swappable."""

    def __init__(self) -> None:
        self.state: ExportState | None = None
        self.config = Config()
        self.health = Health()

    def app(self, web_config: WebConfig | None = None, process_metrics: bool = False) -> WebApp:
        return WebApp(
            lambda: self.state,
            lambda: self.config,
            lambda: self.health,
            web_config,
            include_process_metrics=process_metrics,
            clock=lambda: 1_700_000_042.0,
        )


def get(app: WebApp, path: str, **headers: str) -> Response:
    return app.respond("GET", path, {k.replace("_", "-").lower(): v for k, v in headers.items()})


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- routes ----------------------------------------------------------------------------------------


def test_ready_only_after_the_first_poll() -> None:
    holder = Holder()
    app = holder.app()
    response = get(app, "/-/ready")
    assert response.status == 503
    assert b"first poll" in response.body
    holder.state = export_state()
    assert get(app, "/-/ready").status == 200


def test_healthy_follows_the_poll_loop() -> None:
    holder = Holder()
    app = holder.app()
    assert get(app, "/-/healthy").status == 200  # healthy before the first poll: it is starting
    holder.health = Health("the poll loop is stuck")
    response = get(app, "/-/healthy")
    assert response.status == 503
    assert b"the poll loop is stuck" in response.body


def test_metrics_render_the_latest_state() -> None:
    holder = Holder()
    app = holder.app()
    before = get(app, "/metrics")
    assert before.status == 200
    assert before.content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"tcpwatch_build_info" in before.body
    assert b"tcpwatch_sockets" not in before.body  # nothing polled yet
    holder.state = export_state(finding())
    after = get(app, "/metrics")
    text = after.body.decode()
    assert 'tcpwatch_sockets{family="ipv4",netns="host",state="close_wait"} 2.0' in text
    assert "Cached: values are from the latest poll" in text
    assert 'tcpwatch_source_up{netns="host",source="sysctl"} 0.0' in text
    assert "tcpwatch_last_poll_timestamp_seconds 1.7e+09" in text
    assert 'tcpwatch_finding{id="Q01",netns="host",severity="critical"' in text


# What Prometheus 2.x sends; 3.x adds escaping= and text/plain;version=1.0.0 alternatives.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize("accept", ["", "text/plain", "*/*", "text/html,application/xhtml+xml"])
def test_metrics_are_text_unless_openmetrics_is_asked_for(accept: str) -> None:
    holder = Holder()
    holder.state = export_state()
    response = get(holder.app(process_metrics=True), "/metrics", accept=accept)
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in response.body
    assert ("Vary", "Accept") in response.headers


@pytest.mark.parametrize(
    "accept",
    [
        PROMETHEUS_ACCEPT,
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0",
    ],
)
def test_openmetrics_when_the_scraper_asks(accept: str) -> None:
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app(process_metrics=True)
    response = get(app, "/metrics", accept=accept)
    assert response.content_type.startswith("application/openmetrics-text; version=1.0.0;")
    text = response.body.decode()
    # One "# EOF", at the very end, after tcpwatch's families and the self-metrics alike.
    assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
    assert "# TYPE tcpwatch_source_errors counter" in text  # OpenMetrics names the family
    assert "process_cpu_seconds_total" in text
    assert 'tcpwatch_finding{id="Q01",netns="host",severity="critical"' in text
    # A text scrape in between does not hand OpenMetrics to the next text scraper, or back.
    assert b"# EOF" not in get(app, "/metrics").body
    assert get(app, "/metrics", accept=accept).body.decode().count("# EOF") == 1


def test_openmetrics_is_gzipped_as_text_is() -> None:
    holder = Holder()
    holder.state = export_state(finding())
    response = get(holder.app(), "/metrics", accept=PROMETHEUS_ACCEPT, accept_encoding="gzip")
    assert ("Content-Encoding", "gzip") in response.headers
    assert gzip.decompress(response.body).endswith(b"# EOF\n")


def test_name_filter_keeps_only_the_named_samples() -> None:
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app(process_metrics=True)
    query = "/metrics?name[]=tcpwatch_sockets&name[]=process_cpu_seconds_total&name[]=nope"
    text = get(app, query).body.decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert names == {"tcpwatch_sockets", "process_cpu_seconds_total"}
    assert 'tcpwatch_sockets{family="ipv4",netns="host",state="close_wait"} 2.0' in text
    # As in prometheus-client: a sample's own name counts (a counter's _total), in OpenMetrics too.
    filtered = get(app, "/metrics?name[]=tcpwatch_source_errors_total", accept=PROMETHEUS_ACCEPT)
    body = filtered.body.decode()
    assert "tcpwatch_source_errors_total{" in body and body.endswith("# EOF\n")
    assert "tcpwatch_sockets" not in body
    assert get(app, "/metrics?name[]=nope").body == b""
    # The unfiltered scrape after a filtered one is whole again.
    assert "tcpwatch_build_info" in get(app, "/metrics").body.decode()


def _promtool(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is not on PATH (Debian package prometheus)"
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, timeout=120, check=False
    )


def test_both_formats_pass_prometheus_own_parsers(tmp_path: Path) -> None:
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app(process_metrics=True)
    text = get(app, "/metrics").body
    checked = _promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stderr.decode() + checked.stdout.decode()
    # `promtool check metrics` reads the text format only (its parser takes an OpenMetrics
    # counter's `_total` samples for a family of their own); Prometheus' OpenMetrics parser is
    # what `promtool tsdb create-blocks-from openmetrics` runs, and it wants a timestamp on
    # every sample, so each sample line gets one.
    openmetrics = get(app, "/metrics", accept=PROMETHEUS_ACCEPT).body.decode()
    stamped = "".join(
        line if line.startswith("#") else line.rstrip("\n") + " 1700000000\n"
        for line in openmetrics.splitlines(keepends=True)
    )
    source = tmp_path / "scrape.om"
    source.write_text(stamped)
    backfill = _promtool(
        "tsdb", "create-blocks-from", "openmetrics", str(source), str(tmp_path / "blocks")
    )
    output = (backfill.stdout + backfill.stderr).decode()
    assert backfill.returncode == 0 and "error" not in output.lower(), output
    assert any((tmp_path / "blocks").iterdir()), output
    # A broken exposition fails there: the parser is strict, so the check above can fail.
    source.write_text(stamped.removesuffix("# EOF\n"))
    broken = _promtool(
        "tsdb", "create-blocks-from", "openmetrics", str(source), str(tmp_path / "broken")
    )
    assert "EOF" in (broken.stdout + broken.stderr).decode()


def test_process_self_metrics_are_added_per_scrape() -> None:
    holder = Holder()
    holder.state = export_state()
    body = get(holder.app(process_metrics=True), "/metrics").body.decode()
    assert "process_cpu_seconds_total" in body
    assert "python_info" in body
    assert body.count("# TYPE tcpwatch_sockets gauge") == 1


def test_a_state_is_rendered_once_however_many_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    collect = web_app.FamilyMemo.collect

    def counting(memo: web_app.FamilyMemo, state: ExportState | None) -> list[Metric]:
        calls.append(state)
        return collect(memo, state)

    monkeypatch.setattr(web_app.FamilyMemo, "collect", counting)
    holder = Holder()
    holder.state = export_state()
    app = holder.app()
    first = [get(app, "/metrics").body for _ in range(5)]
    assert len(calls) == 1
    assert len(set(first)) == 1
    holder.state = export_state(finding())  # the next poll
    assert get(app, "/metrics").body != first[0]
    assert len(calls) == 2


def test_unknown_path_and_methods() -> None:
    app = Holder().app()
    missing = get(app, "/metricz")
    assert missing.status == 404
    assert b"/metricz" in missing.body
    post = app.respond("POST", "/metrics", {})
    assert post.status == 405
    assert ("Allow", "GET, HEAD") in post.headers
    assert app.respond("HEAD", "/-/healthy", {}).status == 200


def test_gzip_when_accepted() -> None:
    holder = Holder()
    holder.state = export_state()
    app = holder.app()
    plain = get(app, "/metrics")
    zipped = get(app, "/metrics", accept_encoding="deflate, gzip;q=0.8")
    assert ("Content-Encoding", "gzip") in zipped.headers
    assert ("Vary", "Accept-Encoding") in zipped.headers
    assert gzip.decompress(zipped.body) == plain.body
    assert len(zipped.body) < len(plain.body)
    refused = get(app, "/metrics", accept_encoding="gzip;q=0")
    assert refused.body == plain.body
    assert not any(name == "Content-Encoding" for name, _ in refused.headers)
    # Short bodies are not worth compressing.
    assert get(app, "/-/ready", accept_encoding="gzip").body == b"Ready\n"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("x-gzip", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0", False),
        ("gzip;q=junk", False),
        ("deflate, br", False),
        ("", False),
    ],
)
def test_accepts_gzip(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected


# -- landing page ----------------------------------------------------------------------------------


def test_landing_page_shows_version_config_findings_and_links() -> None:
    holder = Holder()
    holder.config = Config(
        source="/etc/tcpwatch/config.yaml",
        interval=30.0,
        collect=CollectSettings(attribute_states=("close_wait", "syn_sent")),
        rules={"Q03": RuleOverride(False), "S01": RuleOverride(True, {"warning": 5.0})},
    )
    app = holder.app(WebConfig(basic_auth_users={"prometheus": HASH}))
    app.listening_on = "127.0.0.1:9477"
    waiting = get(app, "/", authorization=basic("prometheus", PASSWORD)).body.decode()
    assert "The first poll has not finished yet." in waiting
    holder.state = export_state(finding("queue of <script>alert(1)</script> full"))
    response = get(app, "/", authorization=basic("prometheus", PASSWORD))
    assert response.content_type == "text/html; charset=utf-8"
    page = response.body.decode()
    assert f'<h1>tcpwatch <span class="version">{__version__}</span></h1>' in page
    assert '<a href="/metrics">' in page
    for shown in (
        "/etc/tcpwatch/config.yaml",
        "127.0.0.1:9477 (plain HTTP, basic auth (1 user))",
        "30 s",
        "<th>Namespaces</th><td>self</td>",
        "close_wait, syn_sent",
        "Q03 disabled; S01.warning = 5",
        "(42 s ago)",
        '"error":"sysctl broke"',  # the sources and findings travel as JSON, page.js shows them
        "sysctl -w net.core.somaxconn=4096",
        "docs/rules/Q01-accept-queue-full.md",
    ):
        assert shown in page, shown
    # Finding text comes from the host (process names, addresses): it must be escaped.
    assert "<script>alert" not in page
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page


def test_landing_page_without_findings() -> None:
    holder = Holder()
    holder.state = export_state()
    page = get(holder.app(), "/").body.decode()
    assert '"findings":[]' in page
    assert "No active findings" in page  # page.js's text for an empty list


# -- basic auth and rate limits --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/", "/-/healthy", "/-/ready", "/nowhere"])
def test_every_path_needs_credentials_when_users_are_set(path: str) -> None:
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": HASH}))
    response = get(app, path)
    assert response.status == 401
    assert ("WWW-Authenticate", 'Basic realm="tcpwatch", charset="UTF-8"') in response.headers
    assert get(app, path, authorization=basic("prometheus", PASSWORD)).status != 401


@pytest.mark.parametrize(
    "authorization",
    [
        basic("prometheus", "wrong"),
        basic("nobody", PASSWORD),
        basic("prometheus", PASSWORD + "x"),
        basic("prometheus", "p" * 100),  # past bcrypt's 72 bytes
        "Bearer " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode(),
        "Basic not-base64!",
        "Basic " + base64.b64encode(b"no colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:" + PASSWORD.encode()).decode(),
        "",
    ],
)
def test_wrong_credentials_are_refused(authorization: str) -> None:
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": HASH}))
    assert get(app, "/-/healthy", authorization=authorization).status == 401


def test_successful_checks_are_cached_failures_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    auth = BasicAuth({"prometheus": HASH})
    for _ in range(3):
        assert auth.verify(basic("prometheus", PASSWORD)) is AuthResult.OK
    assert len(checks) == 1
    for _ in range(2):
        assert auth.verify(basic("prometheus", "nope")) is AuthResult.DENIED
    assert len(checks) == 3
    # An unknown user costs a bcrypt check too (no timing hint about which users exist).
    assert auth.verify(basic("mallory", PASSWORD)) is AuthResult.DENIED
    assert len(checks) == 4


def test_a_changed_hash_does_not_reuse_the_cache() -> None:
    old = BasicAuth({"prometheus": HASH})
    assert old.verify(basic("prometheus", PASSWORD)) is AuthResult.OK
    new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": HASH}))
    assert get(app, "/-/ready", authorization=basic("prometheus", PASSWORD)).status == 503
    app.set_web_config(WebConfig(basic_auth_users={"prometheus": new_hash}))
    assert get(app, "/-/ready", authorization=basic("prometheus", PASSWORD)).status == 401
    assert get(app, "/-/ready", authorization=basic("prometheus", "rotated")).status == 503


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(RateLimit(interval_seconds=1.0, burst=2), clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert not bucket.take()
    now[0] = 1.0
    assert bucket.take()
    assert not bucket.take()
    now[0] = 100.0  # refills up to burst, no further
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_rate_limited_requests_get_429() -> None:
    app = Holder().app(WebConfig(rate_limit=RateLimit(interval_seconds=3600.0, burst=2)))
    assert [get(app, "/-/healthy").status for _ in range(3)] == [200, 200, 429]


def test_configured_headers_go_on_every_response() -> None:
    headers = {"X-Frame-Options": "deny", "Strict-Transport-Security": "max-age=60"}
    app = Holder().app(WebConfig(headers=headers, basic_auth_users={"prometheus": HASH}))
    for response in (get(app, "/-/healthy"), get(app, "/nowhere")):
        assert ("X-Frame-Options", "deny") in response.headers
        assert ("Strict-Transport-Security", "max-age=60") in response.headers


# -- listen addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9477", ListenAddress("", 9477)),
        ("127.0.0.1:9477", ListenAddress("127.0.0.1", 9477)),
        ("[::1]:9477", ListenAddress("::1", 9477)),
        ("[::]:0", ListenAddress("::", 0)),
        ("localhost:80", ListenAddress("localhost", 80)),
    ],
)
def test_parse_listen(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("9477", 'listen address "9477": expected [ADDRESS]:PORT'),
        ("::1:9477", "put an IPv6 address in brackets"),
        ("[::1]9477", 'listen address "[::1]9477": expected [ADDRESS]:PORT'),
        ("[]:9477", 'listen address "[]:9477": expected [ADDRESS]:PORT'),
        ("127.0.0.1:http", 'port must be a number 0-65535, got "http"'),
        ("127.0.0.1:65536", 'port must be a number 0-65535, got "65536"'),
        (":", 'port must be a number 0-65535, got ""'),
        ("my host:9477", 'listen address "my host:9477": not a valid host name: label "my host"'),
    ],
)
def test_parse_listen_rejects(text: str, problem: str) -> None:
    with pytest.raises(ListenError) as caught:
        parse_listen(text)
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


# -- over real sockets -----------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[Holder, WebServer]]:
    holder = Holder()
    holder.state = export_state()
    server = WebServer(ListenAddress("127.0.0.1", 0), holder.app())
    server.start()
    try:
        yield holder, server
    finally:
        server.stop()


def test_keep_alive_and_head(served: tuple[Holder, WebServer]) -> None:
    _, server = served
    connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        first = connection.getresponse()
        body = first.read()
        assert first.status == 200
        assert int(first.getheader("Content-Length", "0")) == len(body)
        connection.request("HEAD", "/metrics")  # the same connection, kept alive
        head = connection.getresponse()
        assert head.status == 200
        assert head.read() == b""
        assert int(head.getheader("Content-Length", "0")) == len(body)
        assert head.getheader("Server") == f"tcpwatch/{__version__}"
    finally:
        connection.close()


def test_kept_alive_scrapes_are_not_held_up_by_delayed_acks(
    served: tuple[Holder, WebServer],
) -> None:
    # Headers and body written separately would wait for the client's delayed ACK (40 ms on
    # Linux) on every scrape of a reused connection, which is how Prometheus scrapes.
    _, server = served
    connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    took = []
    try:
        for _ in range(15):
            started = time.perf_counter()
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200
            response.read()
            took.append(time.perf_counter() - started)
    finally:
        connection.close()
    assert statistics.median(took) < 0.03, took


@pytest.mark.parametrize("deferred", [0, 4])
def test_overload_waits_for_room_then_gets_a_quick_503(
    monkeypatch: pytest.MonkeyPatch, deferred: int
) -> None:
    # One worker, one queue place: a request that finds both taken waits (parked, unanswered)
    # for room while DEFERRED others do not wait already; past that it is answered 503 at once.
    monkeypatch.setattr(web_server.limits, "WORKERS", 1)
    monkeypatch.setattr(web_server.limits, "READY_QUEUE", 1)
    monkeypatch.setattr(web_server.limits, "DEFERRED", deferred)
    holder = Holder()
    holder.state = export_state()
    app = holder.app()
    release = threading.Event()
    real = app.respond

    def held(*args: object, **kwargs: object) -> Response:
        release.wait(10)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(app, "respond", held)
    server = WebServer(ListenAddress("127.0.0.1", 0), app)
    server.start()
    busy = [socket.create_connection(("127.0.0.1", server.address.port), timeout=5)]
    try:
        busy[0].sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # taken by the worker
        time.sleep(0.2)
        busy.append(socket.create_connection(("127.0.0.1", server.address.port), timeout=5))
        busy[1].sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # waits in the queue
        time.sleep(0.2)
        connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
        started = time.monotonic()
        connection.request("GET", "/metrics")
        if deferred:
            time.sleep(0.3)
            release.set()  # the worker moves on: the waiting request gets its turn
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        else:
            response = connection.getresponse()
            assert response.status == 503
            assert b"Too many parallel requests" in response.read()
            assert time.monotonic() - started < 1.0
        connection.close()
    finally:
        release.set()
        for sock in busy:
            sock.close()
        server.stop()


def test_a_failing_render_is_a_500_and_the_server_goes_on(
    served: tuple[Holder, WebServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, server = served
    holder.state = replace(export_state(), poll_durations=None)  # type: ignore[arg-type]
    connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    connection.request("GET", "/metrics")
    assert connection.getresponse().status == 500
    connection.close()
    holder.state = export_state()
    connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    connection.request("GET", "/metrics")
    assert connection.getresponse().status == 200
    connection.close()


def test_every_address_means_ipv6_and_ipv4() -> None:
    server = WebServer(ListenAddress("", 0), Holder().app())
    server.start()
    try:
        assert server.address.host == "::"
        for host in ("127.0.0.1", "::1"):
            connection = http.client.HTTPConnection(host, server.address.port, timeout=5)
            connection.request("GET", "/-/healthy")
            assert connection.getresponse().status == 200
            connection.close()
        assert server.url == f"http://localhost:{server.address.port}/metrics"
    finally:
        server.stop()


def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            WebServer(ListenAddress("127.0.0.1", port), Holder().app())
    assert str(caught.value) == (
        f"cannot listen on 127.0.0.1:{port}: the port is already in use (another tcpwatch or "
        "exporter running?)"
    )


def test_address_not_on_this_host() -> None:
    with pytest.raises(ListenError) as caught:
        WebServer(ListenAddress("192.0.2.1", 0), Holder().app())  # TEST-NET-1
    assert str(caught.value) == (
        "cannot listen on 192.0.2.1:0: no interface of this host has that address"
    )


def test_unresolvable_host() -> None:
    with pytest.raises(ListenError) as caught:
        WebServer(ListenAddress("no-such-host.invalid", 0), Holder().app())
    assert str(caught.value).startswith(
        'cannot listen on no-such-host.invalid:0: cannot resolve "no-such-host.invalid": '
    )
