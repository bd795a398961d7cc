"""/metrics formats and renderings (tcpwatch.http.exposition): negotiation as client_golang does
it, renderings cached per poll and format and bounded whatever the headers say, `name[]` and
gzip from the cached bytes.
"""

from __future__ import annotations

import gzip
import logging
import zlib

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from tcpwatch.http import app as web_app
from tcpwatch.http import exposition
from tcpwatch.http.exposition import Format, negotiate
from tcpwatch.render import prometheus
from tcpwatch.state import ExportState

from .test_web import PROMETHEUS_ACCEPT, Holder, export_state, finding, get

# What Prometheus 3 sends by default (scrape_protocols without protobuf).
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)
OM = "application/openmetrics-text"
TEXT_1 = "text/plain; version=1.0.0; charset=utf-8"


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", "text/plain; version=0.0.4; charset=utf-8"),
        ("*/*", "text/plain; version=0.0.4; charset=utf-8"),
        ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
        (PROMETHEUS_ACCEPT, f"{OM}; version=1.0.0; charset=utf-8; escaping=underscores"),
        (PROMETHEUS_3_ACCEPT, f"{OM}; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
        (OM, f"{OM}; version=1.0.0; charset=utf-8"),
        (f"{OM}; version=2.0.0", f"{OM}; version=2.0.0; charset=utf-8; escaping=underscores"),
        (
            "text/plain;version=1.0.0",
            "text/plain; version=1.0.0; charset=utf-8; escaping=underscores",
        ),
        # Issue 21: versions tcpwatch does not write are passed over, never an error ...
        (f"{OM}; version=abc", "text/plain; version=0.0.4; charset=utf-8"),
        (f"{OM}; version=2.7", "text/plain; version=0.0.4; charset=utf-8"),
        ("text/plain; version=abc", "text/plain; version=0.0.4; charset=utf-8"),
        # ... nor does their text reach the content type: one per format, not per header.
        (f"{OM}; version=2.0.0x, {OM}", f"{OM}; version=1.0.0; charset=utf-8"),
        # q orders the entries; q=0 means never.
        (f"text/plain;q=0.2, {OM};q=0.9", f"{OM}; version=1.0.0; charset=utf-8"),
        (f"{OM};q=0, text/plain;q=0.1", "text/plain; version=0.0.4; charset=utf-8"),
        (f"{OM};q=junk", "text/plain; version=0.0.4; charset=utf-8"),
        (
            f"{OM};version=1.0.0;escaping=nonsense",
            f"{OM}; version=1.0.0; charset=utf-8; escaping=underscores",
        ),
        (";;,=,;q=;", "text/plain; version=0.0.4; charset=utf-8"),
    ],
)
def test_negotiation(accept: str, content_type: str) -> None:
    assert negotiate(accept).content_type == content_type


def test_an_unknown_version_is_served_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    holder = Holder()
    holder.state = export_state()
    app = holder.app(process_metrics=True)
    caplog.set_level(logging.DEBUG)
    for version in ("abc", "2.x", "", "1.0.0.0", "\x00"):
        response = get(app, "/metrics", accept=f"{OM}; version={version}")
        assert response.status == 200, version
        assert b"tcpwatch_build_info" in response.body
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_renderings_are_bounded_by_formats_not_by_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[object] = []
    collect = web_app.FamilyMemo.collect

    def counting(memo: web_app.FamilyMemo, state: ExportState | None) -> list[Metric]:
        collected.append(state)
        return collect(memo, state)

    monkeypatch.setattr(web_app.FamilyMemo, "collect", counting)
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app()
    for n in range(200):
        get(app, "/metrics", accept=f"{OM}; version=2.{n}")  # each distinct, each text
        get(app, "/metrics", accept=f"{OM}; version=1.0.0; escaping=e{n}")  # one format
    current = app._expositions._current
    assert current is not None
    assert len(current._formats) == 2  # text, and OpenMetrics 1.0.0 with underscores
    assert len(collected) == 1  # one collect for the state, whatever was asked


def test_name_filters_use_the_cached_families(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[object] = []
    real = prometheus.make_registry
    collect = web_app.FamilyMemo.collect

    def counting(memo: web_app.FamilyMemo, state: ExportState | None) -> list[Metric]:
        collected.append(state)
        return collect(memo, state)

    monkeypatch.setattr(web_app.FamilyMemo, "collect", counting)
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app(process_metrics=True)
    families = list(real(lambda: holder.state, include_process=False).collect())
    queries = [
        ["tcpwatch_sockets"],
        ["tcpwatch_sockets", "tcpwatch_source_errors_total", "process_cpu_seconds_total"],
        ["tcpwatch_source_errors_total"],  # a counter by its sample's name
        ["tcpwatch_poll_duration_seconds_count"],  # a histogram's one sample kind
        ["nope"],
    ]
    for names in queries:
        query = "&".join(f"name[]={name}" for name in names)
        for accept, fmt in (("", exposition.TEXT), (PROMETHEUS_ACCEPT, negotiate(OM))):
            response = get(app, f"/metrics?{query}", accept=accept)
            # tcpwatch's part is what prometheus-client's restricted registry makes of the same
            # families; the last part is the self-metrics, filtered the same way.
            registry = CollectorRegistry()
            registry.register(exposition._Families(families))
            expected = fmt.encode(registry.restricted_registry(names)).removesuffix(b"# EOF\n")
            assert b"".join(response.parts[:-1]) == expected, names
            tail = response.parts[-1]
            assert (b"process_cpu_seconds_total" in tail) == ("process_cpu_seconds_total" in names)
            assert tail.endswith(b"# EOF\n") == fmt.openmetrics
    assert len(collected) == 1


def test_gzip_is_made_once_per_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = zlib.compressobj

    def counting(*args: int) -> zlib._Compress:
        made.append(1)
        return real(*args)

    monkeypatch.setattr(exposition.zlib, "compressobj", counting)
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app(process_metrics=True)
    plain = get(app, "/metrics").body.decode()
    bodies = [get(app, "/metrics", accept_encoding="gzip") for _ in range(5)]
    assert len(made) == 1
    for response in bodies:
        assert ("Content-Encoding", "gzip") in response.headers
        text = gzip.decompress(response.body).decode()
        # The self-metrics differ per scrape; everything else is the same bytes.
        assert text.split("# HELP process_")[0] == plain.split("# HELP process_")[0]
        assert "process_cpu_seconds_total" in text
    # The shared part of every gzipped body is one object, never copied per scrape.
    assert len({id(response.parts[0]) for response in bodies}) == 1
    om = get(app, "/metrics", accept=PROMETHEUS_ACCEPT, accept_encoding="gzip")
    assert gzip.decompress(om.body).endswith(b"# EOF\n")
    assert len(made) == 2  # a second format, a second compressor


def test_the_cached_body_is_shared_not_copied() -> None:
    holder = Holder()
    holder.state = export_state(finding())
    app = holder.app()
    first, second = get(app, "/metrics"), get(app, "/metrics")
    assert first.parts[0] is second.parts[0]
    holder.state = export_state()  # the next poll: rendered afresh
    assert get(app, "/metrics").parts[0] is not first.parts[0]


def test_a_format_knows_its_own_key() -> None:
    # The text format's version changes its content type, not its bytes.
    assert Format(False, "0.0.4").key == Format(False, "1.0.0").key
    assert Format(True, "1.0.0").key != Format(True, "2.0.0").key
