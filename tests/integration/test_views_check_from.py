"""`tcpwatch check --from URL`: the daemon's findings, reported as a direct `check` reports the
same namespace (same findings, same exit code), and one-line errors with exit 3 when the daemon
cannot be read."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .browser import Browser
from .netns import REPO_ROOT, Netns, run_tcpwatch, tcpwatch_env
from .views import PASSWORD, USER, problem_host

pytestmark = pytest.mark.integration

# A server that answers every request with 500 (a daemon in trouble), until killed.
_FAILING_SERVER = """
import http.server, sys
class Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"Internal error: poll thread died\\n"
        self.send_response(500); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Failing)
print("ready", flush=True)
server.serve_forever()
"""


def tcpwatch_with(ns: Netns, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, "-m", "tcpwatch", *args, check=False, timeout=120,
                  env={**tcpwatch_env(), **env}, cwd=str(REPO_ROOT))  # fmt: skip


def key(finding: dict[str, object]) -> tuple[object, ...]:
    return (finding["id"], finding["severity"], finding["subject"], finding["title"])


def one_line_exit_3(ns: Netns, *args: str) -> str:
    done = run_tcpwatch(ns, "check", *args, timeout=60)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpwatch: "), done.stderr
    assert done.stdout == f"TCPWATCH UNKNOWN - {lines[0].removeprefix('tcpwatch: ')}\n"
    return lines[0]


def test_check_from_equals_a_direct_check(tmp_path: Path) -> None:
    with problem_host(tmp_path, hostile=False) as setup:
        url = setup.auth_url
        config = str(tmp_path / "config.yaml")
        for _ in range(5):  # TIME_WAIT or a poll can move between the two: retry a few times
            direct = run_tcpwatch(setup.host, "check", "--config", config, "--format", "json",
                                  "--window", "1")  # fmt: skip
            remote = run_tcpwatch(setup.viewer, "check", "--from", url, "--netns",
                                  setup.host.name, "--format", "json")  # fmt: skip
            ours, theirs = json.loads(direct.stdout), json.loads(remote.stdout)
            if sorted(map(key, ours["findings"])) == sorted(map(key, theirs["findings"])):
                break
            time.sleep(1)
        assert sorted(map(key, theirs["findings"])) == sorted(map(key, ours["findings"]))
        assert {f["id"] for f in theirs["findings"]} >= {"Q01", "S01"}
        assert remote.returncode == direct.returncode == theirs["exit_code"] == 2
        assert set(theirs) >= set(ours) and theirs["status"] == ours["status"] == "CRITICAL"
        assert [ns["netns"] for ns in theirs["namespaces"]] == [setup.host.name]
        # The daemon judges over its rules.window (1 min by default), or the time since its first
        # poll while it is younger: a few seconds here, more on a loaded machine (13 s once).
        assert 0 < theirs["window_seconds"] <= 60 + 1

        text = run_tcpwatch(setup.viewer, "check", "--from", url, "--netns", setup.host.name)
        mine = run_tcpwatch(setup.host, "check", "--config", config, "--window", "1")
        assert text.returncode == mine.returncode == 2
        # The status line is the same; its perfdata gauges (orphans, TIME_WAIT: the test's own
        # connections) may move between the two runs, so only their names are compared.
        status, _, perfdata = text.stdout.splitlines()[0].partition(" | ")
        mine_status, _, mine_perfdata = mine.stdout.splitlines()[0].partition(" | ")
        assert status == mine_status
        names = [item.split("=")[0] for item in perfdata.split()]
        assert names == [item.split("=")[0] for item in mine_perfdata.split()] and names
        assert text.stdout.splitlines()[0].startswith("TCPWATCH CRITICAL - 1 critical, 1 warning")
        assert "accept-queue-full" in text.stdout and "fix" in text.stdout

        # Every namespace the daemon polls, without --netns: its own too.
        both = json.loads(
            run_tcpwatch(setup.viewer, "check", "--from", url, "--format", "json").stdout
        )
        assert len(both["namespaces"]) == 2

        # The errors: no or wrong password, nothing listening, a bad URL.
        plain = setup.url
        assert "401" in one_line_exit_3(setup.viewer, "--from", plain)
        assert "401" in one_line_exit_3(
            setup.viewer, "--from", f"http://{USER}:no@127.0.0.1:{setup.served.port}"
        )
        assert "cannot reach" in one_line_exit_3(setup.viewer, "--from", "http://127.0.0.1:1")
        assert "expected a URL" in one_line_exit_3(setup.viewer, "--from", "ftp://x")
        assert "--window" in one_line_exit_3(setup.viewer, "--from", url, "--window", "2")
        assert PASSWORD not in one_line_exit_3(
            setup.viewer, "--from", f"http://{USER}:{PASSWORD}@127.0.0.1:1"
        )


def test_check_from_a_daemon_answering_500(netns: Netns) -> None:
    server = netns.spawn([sys.executable, "-c", _FAILING_SERVER, "19499"])
    assert netns.read_line(server, timeout=20) == "ready"
    line = one_line_exit_3(netns, "--from", "http://127.0.0.1:19499")
    assert "500" in line and "poll thread died" in line, line


def test_over_tls_check_from_the_page_and_top_work(tmp_path: Path) -> None:
    with problem_host(tmp_path, hostile=False, tls=True) as setup:
        assert setup.ca_file is not None
        trusted = {"SSL_CERT_FILE": str(setup.ca_file)}
        done = tcpwatch_with(setup.viewer, trusted, "check", "--from", setup.auth_url, "--netns",
                             setup.host.name, "--format", "json")  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert {f["id"] for f in json.loads(done.stdout)["findings"]} >= {"Q01", "S01"}
        # Without the CA the certificate is refused, in one line.
        assert "TLS" in one_line_exit_3(setup.viewer, "--from", setup.auth_url)
        # Plain HTTP to the TLS port is not an answer either.
        plain = setup.auth_url.replace("https://", "http://")
        one_line_exit_3(setup.viewer, "--from", plain)

        top = tcpwatch_with(setup.viewer, trusted, "top", "--from", setup.auth_url, "--netns",
                            setup.host.name, "-b")  # fmt: skip
        assert top.returncode == 0 and "CRITICAL Q01" in top.stdout, top.stderr

        # The page over HTTPS (the test CA is not in Chromium's store: its errors are ignored),
        # with basic auth, fills its diagram from the API.
        with Browser(
            setup.viewer.exec_argv, extra_args=("--ignore-certificate-errors",)
        ) as browser:
            browser.open(setup.url + "/", user=USER, password=PASSWORD)
            browser.wait_for("document.body.dataset.updated > 0")
            assert browser.evaluate("location.protocol") == "https:"
            browser.evaluate(
                "(() => { const s = document.getElementById('netns');"
                f" s.value = {json.dumps(setup.host.name)};"
                " s.dispatchEvent(new Event('change')); })()"
            )
            browser.wait_for(
                "document.querySelector('#state-close_wait .count').textContent === '16'"
            )
