"""The JSON API (tcpwatch/render/api.py): its fields are the ones docs/api.md documents, lists
are cut and paginated, findings are the check JSON report, and the trends behind rates and
history."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tcpwatch.http.webconfig import RateLimit, WebConfig
from tcpwatch.model import STATES, DestinationUse, ProcessRef
from tcpwatch.render import api
from tcpwatch.render.json import render_json
from tcpwatch.rules import Finding
from tcpwatch.state import ExportState
from tcpwatch.trends import TREND_POLLS, next_trend

from .snapshots import T0, T1, listener, snapshot, socket_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def documented(section: str) -> set[str]:
    """The field names of the table under ``### section`` in docs/api.md."""
    text = DOC.read_text()
    body = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z_0-9]+)` \|", body, re.M))


def problem_state() -> ExportState:
    listeners = [listener(8080, queue_length=129, queue_max=128, inode=900)]
    listeners += [listener(9000 + i, queue_length=i % 7, queue_max=64) for i in range(120)]
    uses = [DestinationUse("ipv4", "10.0.0.5", "10.0.0.9", 5432, 20_000, 19_000)]
    table = socket_table(listeners=listeners, ephemeral_use=uses, close_wait_inodes=[1, 2, 3])
    owners = {
        900: ProcessRef(1234, "nginx"),
        1: ProcessRef(77, "<script>"),
        2: ProcessRef(77, "<script>"),
    }
    before = snapshot(taken_at=T0, sockets=table, owners=owners)
    after = snapshot(taken_at=T1, sockets=table, owners=owners)
    trend = next_trend(next_trend(None, None, before), before, after)
    finding = Finding(
        "Q01", "accept-queue-full", "critical", "full", "host", "0.0.0.0:8080",
        MappingProxyType({"queue_length": 129}), "fix it", "docs/rules/Q01-accept-queue-full.md",
    )  # fmt: skip
    return ExportState((after,), (finding,), last_poll=T1, trends={"host": trend}, interval=5.0)


def test_snapshot_fields_are_the_documented_ones() -> None:
    document = json.loads(json.dumps(api.snapshot_document(problem_state(), api.SnapshotQuery())))
    assert set(document) == documented("Top level")
    (namespace,) = document["namespaces"]
    assert set(namespace) == documented("A namespace")
    assert set(namespace["listeners"]) == {"total", "offset", "limit", "items"}
    assert set(namespace["listeners"]["items"][0]) == documented("A listener")
    assert set(namespace["destinations"]["items"][0]) == documented("A destination")
    assert set(namespace["states"]) == {"ipv4", "ipv6", "total"}
    assert all(list(counts) == list(STATES) for counts in namespace["states"].values())
    assert document["api_version"] == api.API_VERSION == 1


def test_snapshot_values_listeners_by_fill_holders_and_rates() -> None:
    document = api.snapshot_document(problem_state(), api.SnapshotQuery())
    (namespace,) = document["namespaces"]
    first = namespace["listeners"]["items"][0]
    assert (first["endpoint"], first["process"], first["pid"]) == ("0.0.0.0:8080", "nginx", 1234)
    assert first["fill_ratio"] == pytest.approx(129 / 128, abs=1e-4)
    fills = [item["fill_ratio"] for item in namespace["listeners"]["items"]]
    assert fills == sorted(fills, reverse=True)
    assert namespace["close_wait_holders"] == [
        {"process": "<script>", "pid": 77, "sockets": 2},
        {"process": None, "pid": None, "sockets": 1},
    ]
    destination = namespace["destinations"]["items"][0]
    assert destination["destination"] == "10.0.0.9:5432" and destination["time_wait"] == 19_000
    assert namespace["history"]["times"] == [T0, T1]
    assert namespace["history"]["states"]["close_wait"] == [3, 3]
    assert all(rate >= 0 for rate in namespace["rates"].values())
    assert all(name.startswith("Tcp") for name in namespace["counters"])


def test_listeners_are_paginated_and_sorted_on_request() -> None:
    state = problem_state()
    query = api.snapshot_query({"limit": "10", "offset": "115", "sort": "port"})
    page = api.snapshot_document(state, query)["namespaces"][0]["listeners"]
    assert page["total"] == 121
    assert [item["port"] for item in page["items"]] == sorted(
        item["port"] for item in page["items"]
    )
    assert len(page["items"]) == page["total"] - 115
    default = api.snapshot_document(state, api.snapshot_query({}))["namespaces"][0]["listeners"]
    assert len(default["items"]) == api.DEFAULT_LIMIT


@pytest.mark.parametrize(
    "query",
    [{"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"offset": "-1"}, {"sort": "name"}],
)
def test_queries_out_of_range_are_refused_by_name(query: dict[str, str]) -> None:
    with pytest.raises(api.QueryError, match=next(iter(query))):
        api.snapshot_query(query)


def test_findings_are_the_check_json_report() -> None:
    state = problem_state()
    site = "https://docs.internal/tcpwatch"
    document = api.findings_document(state, None, api.DEFAULT_FINDINGS_LIMIT, site)
    expected = json.loads(render_json(state.findings, state.snapshots, 5.0, site))
    assert document == expected  # the same schema, field for field; window = between two polls
    assert document["findings"][0]["doc_url"] == f"{site}/docs/rules/Q01-accept-queue-full.md"
    # With no docs_url, each finding links the page this daemon serves (issue 22 item 1).
    served = api.findings_document(state, None, api.DEFAULT_FINDINGS_LIMIT)
    assert [f["doc_url"] for f in served["findings"]] == ["/rules/Q01"]
    assert (
        json.loads(render_json(state.findings, state.snapshots, 5.0))["findings"][0]["doc_url"]
        is None
    )  # a one-shot check has no page to serve
    cut = api.findings_document(state, None, 1)
    assert "findings_total" not in cut
    assert api.findings_document(state, "elsewhere", 10)["findings"] == []


def test_findings_cut_still_count_every_finding() -> None:
    state = problem_state()
    many = ExportState(state.snapshots, state.findings * 3, state.last_poll)
    cut: dict[str, Any] = api.findings_document(many, None, 2)
    assert len(cut["findings"]) == 2 and cut["findings_total"] == 3
    assert cut["summary"]["critical"] == 3 and cut["exit_code"] == 2


def test_trend_keeps_a_bounded_history_and_skips_failed_polls() -> None:
    trend = None
    previous = None
    for index in range(TREND_POLLS + 15):
        current = snapshot(taken_at=T0 + index)
        trend = next_trend(trend, previous, current)
        previous = current
    assert trend is not None and len(trend.times) == len(trend.totals) == TREND_POLLS
    failed = snapshot(taken_at=T0 + 500, sockets=None)
    assert next_trend(trend, previous, failed).times == trend.times
    reset = snapshot(taken_at=T0 + 501, counters={"TcpActiveOpens": 0})
    grown = snapshot(taken_at=T0 + 503, counters={"TcpActiveOpens": 10})
    assert next_trend(None, reset, grown).rates == {"TcpActiveOpens": 5.0}
    assert next_trend(None, grown, reset).rates == {}  # went down: no rate


# -- through the routes: the same auth, rate limit and headers as /metrics -----------------------


def test_api_routes_answer_json_behind_auth_and_rate_limit() -> None:
    from .test_web import HASH, PASSWORD, Holder, basic, get

    holder = Holder()
    app = holder.app(
        WebConfig(basic_auth_users={"prometheus": HASH}, rate_limit=RateLimit(3600.0, 5))
    )
    login = basic("prometheus", PASSWORD)
    assert get(app, "/api/v1/snapshot").status == 401
    assert get(app, "/api/v1/findings", authorization=login).status == 503  # no poll yet
    holder.state = problem_state()
    snapshot = get(app, "/api/v1/snapshot?limit=2&sort=syn_recv", authorization=login)
    assert snapshot.status == 200 and snapshot.content_type == "application/json"
    assert ("X-Content-Type-Options", "nosniff") in snapshot.headers
    assert len(json.loads(snapshot.body)["namespaces"][0]["listeners"]["items"]) == 2
    findings = json.loads(get(app, "/api/v1/findings", authorization=login).body)
    assert findings["status"] == "CRITICAL" and findings["findings"][0]["id"] == "Q01"
    bad = get(app, "/api/v1/snapshot?offset=x", authorization=login)
    assert bad.status == 400 and b"offset" in bad.body
    assert get(app, "/api/v1/snapshot", authorization=login).status == 429  # the 6th request


def test_top_screen_fits_any_width_and_keeps_host_strings_as_they_are() -> None:
    from tcpwatch.top.screen import View, fit, layout

    state = problem_state()
    snapshot = api.snapshot_document(state, api.SnapshotQuery(limit=5))
    findings = api.findings_document(state, None, 100)
    wide = layout(snapshot, findings, View(source="test"), 160)
    text = "\n".join(line.text for line in wide)
    assert "0.0.0.0:8080" in text and "nginx[1234]" in text and "<script>[77]" in text
    assert sum(1 for line in wide if line.text.startswith("STATE ")) == 1
    narrow = layout(snapshot, findings, View(source="test"), 60)
    assert all(len(line.text) <= 60 for line in narrow)
    assert sum(1 for line in narrow if line.text.startswith("STATE ")) >= 2
    screen = fit(narrow, 60, 20)
    assert len(screen) == 20 and screen[-1].text.startswith("q quit")


def test_slow_peers_waiting_first_with_their_owner_and_the_documented_fields() -> None:
    """Who is slow, per (direction, peer), from the live scans (docs/api.md "A slow peer")."""
    from tests.unit.test_rules_slowness import LOSSY, NOT_READING, SLOW_CLIENTS, scanned, stalls

    healthy = stalls(connections=9, busy=30.0, rwnd=1.0)
    snap = scanned(inbound=SLOW_CLIENTS, outbound=NOT_READING)
    uses = (
        *(snap.sockets.ephemeral_use if snap.sockets else ()),
        DestinationUse("ipv4", "10.0.0.1", "10.0.0.8", 443, 9, 0, stalls=healthy),
        DestinationUse("ipv4", "10.0.0.1", "10.0.0.7", 80, 4, 0, stalls=LOSSY),
    )
    assert snap.sockets is not None
    snap = replace(snap, sockets=replace(snap.sockets, ephemeral_use=uses))
    state = ExportState((snap,), (), last_poll=T1, top_destinations=3)
    (namespace,) = api.snapshot_document(state, api.SnapshotQuery())["namespaces"]
    peers = namespace["slow_peers"]
    assert all(set(item) == documented("A slow peer") for item in peers)
    assert [(p["direction"], p["peer"], p["waiting_on"]) for p in peers] == [
        ("inbound", "0.0.0.0:80", "receiver"),  # 19.8 s waited
        ("outbound", "10.0.0.7:80", "network"),  # 1.5 s
        ("outbound", "10.0.0.9:5432", "application"),  # nothing waited, 3 MB unread
    ]  # the healthy destination is cut by top_destinations=3
    assert (peers[0]["process"], peers[0]["pid"]) == ("nginx", 1234)
    assert peers[0]["rwnd_limited_share"] == 0.99 and peers[0]["zero_window"] == 4
    assert peers[1]["retransmission_ratio"] == 0.04 and peers[2]["receive_full"] == 4
    # tcpwatch top shows them, the document checked field by field as from any daemon.
    from tcpwatch.top.documents import checked_snapshot
    from tcpwatch.top.screen import View, layout

    document = json.loads(json.dumps(api.snapshot_document(state, api.SnapshotQuery())))
    checked = checked_snapshot(document)
    lines = [line.text for line in layout(checked, {}, View(source="test"), 120)]
    start = lines.index("WHO IS SLOW: peers by time waiting (live connections)")
    assert lines[start + 2].split() == [
        "clients", "of", "0.0.0.0:80", "nginx[1234]", "receiver", "4", "99%", "0%", "4",
        "15.3M", "0B",
    ]  # fmt: skip
    assert lines[start + 4].split()[:4] == ["to", "10.0.0.9:5432", "curl[4200]", "application"]
    # A daemon from before this field: no block, no error.
    for ns in document["namespaces"]:
        del ns["slow_peers"]
    older = layout(checked_snapshot(document), {}, View(source="test"), 120)
    assert not any(line.text.startswith("WHO IS SLOW") for line in older)


def test_the_same_parsed_counters_give_every_rate_zero_as_equal_ones_do() -> None:
    from dataclasses import replace

    before = snapshot(taken_at=T0, counters={"TcpActiveOpens": 7, "TcpInSegs": 100})
    same = replace(before, taken_at=T0 + 2)  # the very Counters object: the texts unchanged
    equal = snapshot(taken_at=T0 + 2, counters={"TcpActiveOpens": 7, "TcpInSegs": 100})
    assert same.counters is before.counters and equal.counters is not before.counters
    rates = next_trend(None, before, same).rates
    assert (
        rates == next_trend(None, before, equal).rates == {"TcpActiveOpens": 0.0, "TcpInSegs": 0.0}
    )
    assert list(rates) == ["TcpActiveOpens", "TcpInSegs"]
    assert next_trend(None, before, replace(before, taken_at=T0)).rates == {}  # no time passed
