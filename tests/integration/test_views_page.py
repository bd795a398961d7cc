"""The live page in a real browser: headless Chromium loads / from `tcpwatch serve` behind basic
auth, watching a namespace with a full accept queue, CLOSE_WAIT held by a process named
``<script>tw`` and TIME_WAIT; the rendered DOM is compared with ss, and must follow a change in
the population without a reload. The screenshot is kept in build/test-artifacts (or
$TCPWATCH_ARTIFACTS)."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from . import populations
from .browser import Browser
from .views import (
    FULL_PORT,
    HOSTILE_NAME,
    PASSWORD,
    USER,
    ProblemHost,
    artifacts_dir,
    equal_to_ss,
    listener_owner,
    problem_host,
    ss_counts,
)

pytestmark = pytest.mark.integration

# The diagram's numbers as the page shows them: state -> {"total", "ipv4", "ipv6"}.
READ_DIAGRAM = """(() => {
  const out = {};
  for (const group of document.querySelectorAll("#diagram .state")) {
    const counts = {};
    for (const node of group.querySelectorAll("[data-family]")) {
      counts[node.getAttribute("data-family")] = Number(node.textContent);
    }
    out[group.getAttribute("data-state")] = counts;
  }
  return out;
})()"""
READ_LISTENERS = """[...document.querySelectorAll("#listeners tr.listener")].map(
  (row) => [...row.querySelectorAll("td")].map((cell) => cell.textContent))"""


def page_equal_to_ss(browser: Browser, setup: ProblemHost, attempts: int = 6) -> dict[str, Any]:
    """The diagram of a poll taken after ss was read, equal to ss; ss unchanged around it."""
    problem = ""
    for _ in range(attempts):
        before = ss_counts(setup.host)
        asked = time.time()
        browser.wait_for(f"Number(document.body.dataset.updated) > {asked}", timeout=20)
        diagram: dict[str, Any] = browser.evaluate(READ_DIAGRAM)
        if ss_counts(setup.host) != before:
            problem = "ss moved around the poll"
            continue
        problem = equal_to_ss(diagram, before)
        if not problem:
            return diagram
    raise AssertionError(f"the page never matched ss: {problem}")


def test_live_page_matches_ss_follows_changes_and_escapes_host_strings(tmp_path: Path) -> None:
    with problem_host(tmp_path) as setup, Browser(setup.viewer.exec_argv) as browser:
        # Without credentials the page and its API are refused, like /metrics.
        assert setup.served.get("/")[0] == 401
        assert setup.served.get("/api/v1/snapshot")[0] == 401

        browser.open(setup.url + "/", user=USER, password=PASSWORD)
        browser.wait_for("document.body.dataset.updated > 0")
        assert browser.auth_challenges >= 1  # the browser logged in, as a person would
        # Two namespaces are polled: pick the problem host's in the selector.
        names = browser.evaluate(
            "[...document.querySelectorAll('#netns option')].map(o => o.value)"
        )
        assert setup.host.name in names and len(names) == 2, names
        browser.evaluate(
            "(() => { const s = document.getElementById('netns');"
            f" s.value = {json.dumps(setup.host.name)};"
            " s.dispatchEvent(new Event('change')); window.twMarker = 'not reloaded'; })()"
        )
        first = page_equal_to_ss(browser, setup)
        assert first["listen"]["total"] >= 4 and first["close_wait"]["total"] == 16
        assert first["time_wait"]["total"] == 25

        # The full listener comes first, with the owner ss names.
        rows = browser.evaluate(READ_LISTENERS)
        assert rows[0][0] == f"127.0.0.1:{FULL_PORT}", rows
        assert rows[0][1] == listener_owner(setup.host, FULL_PORT), rows
        assert rows[0][2] == "5 / 4", rows
        # Findings with their fixes; the LISTEN state is coloured by Q01.
        titles = browser.evaluate(
            "[...document.querySelectorAll('#findings .finding .title')].map(t => t.textContent)"
        )
        assert any("Q01 accept-queue-full" in t and f":{FULL_PORT}" in t for t in titles), titles
        assert any("S01 close-wait-leak" in t for t in titles), titles
        assert browser.evaluate("document.querySelector('#findings .fix').textContent.length > 20")
        assert browser.evaluate(
            "document.getElementById('state-listen').classList.contains('critical')"
        )
        assert browser.evaluate(
            "document.getElementById('state-close_wait').classList.contains('warning')"
        )

        # The hostile name is shown as text, never as markup: only the page's two scripts exist.
        holder = f"{HOSTILE_NAME}[{setup.leaker.info['pid']}]"
        shown = browser.evaluate(
            "[...document.querySelectorAll('#holders td')].map(c => c.textContent)"
        )
        assert shown[:2] == [holder, "16"], shown
        assert browser.evaluate("document.querySelectorAll('script').length") == 2
        assert holder in [row[1] for row in browser.evaluate(READ_LISTENERS)]

        # Clicking a state explains it, with its history and related findings.
        browser.evaluate(
            "document.getElementById('state-close_wait').dispatchEvent(new MouseEvent('click'))"
        )
        detail = browser.wait_for("document.getElementById('detail').textContent")
        assert detail.startswith("CLOSE_WAIT: 16")
        assert "only the application can end this state" in detail
        assert "S01" in detail
        assert browser.evaluate("document.querySelectorAll('#detail polyline').length") == 1

        screenshot = browser.screenshot(artifacts_dir() / "live-page.png")
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size > 20_000

        # More connections: the page follows without a reload.
        populations.established(setup.host, pairs=7, port=20021)
        second = page_equal_to_ss(browser, setup)
        assert second["established"]["total"] == first["established"]["total"] + 14
        assert browser.evaluate("window.twMarker") == "not reloaded"


def test_page_and_api_need_the_password_and_the_api_refuses_bad_queries(tmp_path: Path) -> None:
    with problem_host(tmp_path, hostile=False) as setup:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        script = (
            "import http.client, sys\n"
            "c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[1]), timeout=20)\n"
            "c.request('GET', sys.argv[2], headers={'Authorization': sys.argv[3]})\n"
            "r = c.getresponse(); print(r.status); print(r.read().decode())\n"
        )

        def get(path: str, auth: str) -> tuple[int, str]:
            done = setup.viewer.run(
                sys.executable, "-c", script, str(setup.served.port), path, auth
            )
            status, _, body = done.stdout.partition("\n")
            return int(status), body

        assert (
            get("/api/v1/findings", "Basic " + base64.b64encode(b"oncall:wrong").decode())[0] == 401
        )
        status, body = get(f"/api/v1/snapshot?netns={setup.host.name}&limit=1", "Basic " + token)
        assert status == 200, body
        document = json.loads(body)
        (namespace,) = document["namespaces"]
        assert namespace["listeners"]["total"] >= 4 and len(namespace["listeners"]["items"]) == 1
        assert namespace["listeners"]["items"][0]["port"] == FULL_PORT
        assert get("/api/v1/snapshot?limit=0", "Basic " + token)[0] == 400
        assert get("/api/v1/snapshot?sort=name", "Basic " + token)[0] == 400
