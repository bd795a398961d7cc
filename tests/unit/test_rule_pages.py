"""The rule pages `tcpwatch serve` shows at /rules/ and /rules/<ID> (issue 22 item 1): the page
a finding, an alert's runbook_url and the dashboard link to when the site publishes no docs."""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace

import pytest

from tcpwatch.http.webconfig import WebConfig
from tcpwatch.render.rulepage import read_rule_page, rule_named, rule_page_html
from tcpwatch.rules import RULES

from .test_web import HASH, PASSWORD, Holder, basic, export_state, finding, get

SITE = "https://docs.internal/tcpwatch"


def test_each_rule_page_is_its_installed_markdown_escaped() -> None:
    app = Holder().app()
    for rule in RULES:
        response = get(app, f"/rules/{rule.id}")
        assert response.status == 200, rule.id
        assert response.content_type == "text/html; charset=utf-8"
        body = response.body.decode()
        text = read_rule_page(rule)
        assert text is not None and text.startswith(f"# {rule.id} ")
        assert f"<pre>{html.escape(text)}</pre>" in body, rule.id
        assert f"<title>tcpwatch {rule.id} {rule.slug}</title>" in body
        assert 'href="./"' in body and 'href="../"' in body  # all rules, the live page
        assert "tcpwatch rules " + rule.id in body
    # Markup in a page stays text: C01's page has "<" and "&" in it.
    c01 = get(app, "/rules/C01").body.decode()
    assert "&lt;" in c01 or "&amp;" in c01
    assert c01.count("<pre>") == 1


@pytest.mark.parametrize("name", ["q01", "Q01", "accept-queue-full", "ACCEPT-QUEUE-FULL"])
def test_a_rule_is_found_by_id_or_slug(name: str) -> None:
    assert rule_named(name) is rule_named("Q01")
    assert get(Holder().app(), f"/rules/{name}").status == 200


def test_the_index_links_every_rule() -> None:
    response = get(Holder().app(), "/rules/")
    assert response.status == 200
    body = response.body.decode()
    assert re.findall(r'<td><a href="([A-Z]\d\d)">', body) == [rule.id for rule in RULES]


@pytest.mark.parametrize(
    "path",
    [
        "/rules/Q99",
        "/rules/../../etc/passwd",
        "/rules/Q01/extra",
        "/rules/%51%30%31",  # never decoded into a name, never a file path
        "/rules/" + "Q" * 500,
        "/rules",
    ],
)
def test_unknown_rules_are_404_and_nothing_is_read_by_path(path: str) -> None:
    response = get(Holder().app(), path)
    assert response.status == 404
    assert len(response.body) < 200


def test_head_and_methods() -> None:
    app = Holder().app()
    assert app.respond("HEAD", "/rules/Q01", {}).status == 200
    assert app.respond("POST", "/rules/Q01", {}).status == 405


def test_rule_pages_need_credentials_when_users_are_set() -> None:
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": HASH}))
    assert get(app, "/rules/Q01").status == 401
    ok = get(app, "/rules/Q01", authorization=basic("prometheus", PASSWORD))
    assert ok.status == 200


def test_a_site_that_publishes_its_docs_gets_a_link_to_its_copy() -> None:
    holder = Holder()
    assert "published copy" not in get(holder.app(), "/rules/Q01").body.decode()
    holder.config = replace(holder.config, docs_url=SITE)
    body = get(holder.app(), "/rules/Q01").body.decode()
    assert f'<a href="{SITE}/docs/rules/Q01-accept-queue-full.md">published copy</a>' in body
    index = rule_page_html("", SITE)
    assert index is not None and f'href="{SITE}/docs/rules/README.md"' in index


def test_api_findings_link_the_served_page_or_the_configured_docs_url() -> None:
    # Issue 16 item 5: /api/v1/findings uses the configured docs_url.
    holder = Holder()
    holder.state = export_state(finding())
    served = json.loads(get(holder.app(), "/api/v1/findings").body)
    assert [f["doc_url"] for f in served["findings"]] == ["/rules/Q01"]
    assert get(holder.app(), served["findings"][0]["doc_url"]).status == 200
    holder.config = replace(holder.config, docs_url=SITE)
    published = json.loads(get(holder.app(), "/api/v1/findings").body)
    assert [f["doc_url"] for f in published["findings"]] == [
        f"{SITE}/docs/rules/Q01-accept-queue-full.md"
    ]
    # The live page carries the same first answer inline.
    page = get(holder.app(), "/").body.decode()
    data = re.search(r'<script id="tw-data" type="application/json">(.*?)</script>', page, re.S)
    assert data is not None
    inline = json.loads(data.group(1))["findings"]["findings"]
    assert inline[0]["doc_url"] == f"{SITE}/docs/rules/Q01-accept-queue-full.md"
