"""Issue 21 item 7: `check --from` and `top --from` against a hostile HTTP server (a real
socket server in a throw-away namespace: tests/integration/hostile_http.py). A dripping answer
ends at the whole-request deadline; a 60 MB body is cut at 16 MiB without the memory it used to
cost (1.69 GB); deep nesting, wrong types and missing keys are one line naming the field, exit 3;
a document that says OK over a critical finding exits 2; a NUL or escape sequence in a name
reaches neither curses nor the terminal; a reason phrase with escapes is printed escaped."""

from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tcpwatch.model import ProcessRef
from tcpwatch.render import api
from tcpwatch.rules import Finding
from tcpwatch.state import ExportState
from tests.unit.plugin_output import assert_unknown_stdout
from tests.unit.snapshots import T1, listener, snapshot, socket_table

from .netns import REPO_ROOT, Netns, run_tcpwatch, tcpwatch_env
from .test_views_top import Tmux

pytestmark = pytest.mark.integration

PORT = 19483
HELPER = Path(__file__).with_name("hostile_http.py")
SHOWN_NAME = "a\\x00b\\x1b[2J"
PEAK_RSS_LIMIT_MB = 200  # a bare tcpwatch check --from is about 50 MB; it was 1.69 GB


def _state() -> ExportState:
    table = socket_table([listener(8080, queue_length=129, queue_max=128, inode=900)])
    current = snapshot(sockets=table, owners={900: ProcessRef(1234, "nginx")})
    finding = Finding(
        "Q01", "accept-queue-full", "critical", "accept queue full on 0.0.0.0:8080", "host",
        "0.0.0.0:8080", MappingProxyType({"queue_length": 129}), "# raise the backlog\nss -ltn",
        "docs/rules/Q01-accept-queue-full.md",
    )  # fmt: skip
    return ExportState((current,), (finding,), last_poll=T1, interval=5.0)


def _response(body: bytes, status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
    return head.encode("latin-1") + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


def _documents() -> dict[str, bytes]:
    """Every raw response the server gives, by <user><path>."""
    state = _state()
    findings = api.findings_document(state, None, 1000)
    snapshot_doc = api.snapshot_document(state, api.SnapshotQuery())
    files: dict[str, Any] = {}

    def both(user: str, findings_doc: Any, snapshot_document: Any = snapshot_doc) -> None:
        files[f"{user}_api_v1_findings"] = findings_doc
        files[f"{user}_api_v1_snapshot"] = snapshot_document

    both("good", findings)
    wrong = copy.deepcopy(findings)
    wrong["findings"][0]["severity"] = ["x"]
    both("severity", wrong)
    both("findingint", {**findings, "findings": [1]})
    lying = {**findings, "status": "OK", "exit_code": 0, "summary": {"critical": 0}}
    both("lying", lying)
    no_total = copy.deepcopy(snapshot_doc)
    del no_total["namespaces"][0]["listeners"]["total"]
    both("nototal", findings, no_total)
    nul = copy.deepcopy(snapshot_doc)
    nul["namespaces"][0]["listeners"]["items"][0]["process"] = "a\x00b\x1b[2J"
    nul_findings = copy.deepcopy(findings)
    nul_findings["findings"][0]["title"] = "full (a\x00b\x1b[2J)"
    both("nul", nul_findings, nul)
    raw = {name: _response(json.dumps(doc).encode()) for name, doc in files.items()}
    deep = b"[" * 200_000 + b"]" * 200_000
    raw["deep_api_v1_findings"] = raw["deep_api_v1_snapshot"] = _response(deep)
    many = b'{"findings": [' + b"[]," * (5 * 1024 * 1024) + b"[]]}"
    raw["many_api_v1_findings"] = raw["many_api_v1_snapshot"] = _response(many)
    nan = json.dumps(snapshot_doc).replace('"fill_ratio": 1.0078', '"fill_ratio": NaN')
    raw["nan_api_v1_snapshot"] = _response(nan.encode())
    raw["nan_api_v1_findings"] = raw["good_api_v1_findings"]
    reason = _response(b"detail\x1b]0;pwned\x07 here\n", "500 Bad\x1b[2J\x07 news")
    raw["reason_api_v1_findings"] = raw["reason_api_v1_snapshot"] = reason
    return raw


@dataclass
class Hostile:
    ns: Netns

    def url(self, user: str) -> str:
        return f"http://{user}:x@127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    directory = tmp_path_factory.mktemp("hostile")
    for name, data in _documents().items():
        (directory / name).write_bytes(data)
    with Netns() as ns:
        server = ns.spawn([sys.executable, str(HELPER), str(PORT), str(directory)], lifetime=900)
        assert ns.read_line(server, timeout=20) == "ready"
        yield Hostile(ns)


def unknown_line(done: Any) -> str:
    """The one error line of an UNKNOWN exit: exit 3, escaped, no traceback; `check` says it
    on stdout too (its UNKNOWN status)."""
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpwatch: "), done.stderr
    assert lines[0].isprintable(), lines[0]
    assert_unknown_stdout(done.args[done.args.index("tcpwatch") + 1 :], done.stdout, done.stderr)
    return lines[0]


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("severity", "findings[0].severity: expected one of critical, warning, info, got ['x']"),
        ("findingint", "findings[0]: expected an object, got 1"),
        ("deep", "nested too deeply"),
        ("many", "more than 1,000,000 JSON values"),
        ("reason", "answered 500 Bad\\x1b[2J\\x07 news for /api/v1/findings: detail\\x1b]0;pwned"),
    ],
)
def test_check_from_refuses_what_is_not_a_report(
    hostile: Hostile, user: str, expected: str
) -> None:
    for extra in ((), ("--format", "json")):
        line = unknown_line(run_tcpwatch(hostile.ns, "check", "--from", hostile.url(user), *extra))
        assert expected in line, line


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("nototal", "namespaces[0].listeners.total: missing"),
        ("nan", "NaN is not a JSON number"),
        ("findingint", "findings[0]: expected an object"),
        ("reason", "answered 500 Bad\\x1b[2J\\x07 news"),
    ],
)
def test_top_from_refuses_what_is_not_a_document(
    hostile: Hostile, user: str, expected: str
) -> None:
    line = unknown_line(run_tcpwatch(hostile.ns, "top", "-b", "--from", hostile.url(user)))
    assert expected in line, line


def test_a_dripping_server_meets_the_whole_request_deadline(hostile: Hostile) -> None:
    # A byte every 2 s: a timeout per read never fires. The request's deadline is the whole
    # check's -t/--timeout (default 30 s); top's refreshes have 10 s each.
    started = time.monotonic()
    line = unknown_line(run_tcpwatch(hostile.ns, "check", "--from", hostile.url("drip"), "-t", "4"))
    took = time.monotonic() - started
    assert "no complete answer within 4 s" in line, line
    assert took < 20, took  # 4 s and the interpreter's start, on a loaded machine
    started = time.monotonic()
    line = unknown_line(run_tcpwatch(hostile.ns, "top", "-b", "--from", hostile.url("drip")))
    assert "no complete answer within 10 s" in line and time.monotonic() - started < 30


_PEAK = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(done.returncode)
sys.stderr.write(done.stderr)
"""


@pytest.mark.parametrize("user", ["huge", "huge-close", "many"])
def test_a_huge_body_is_cut_without_the_memory(hostile: Hostile, user: str) -> None:
    done = hostile.ns.run(sys.executable, "-c", _PEAK, sys.executable, "-m", "tcpwatch", "check",
                          "--from", hostile.url(user), env=tcpwatch_env(), cwd=str(REPO_ROOT),
                          timeout=120)  # fmt: skip
    peak_mb, code = map(int, done.stdout.split())
    assert code == 3 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "16 MiB" in done.stderr or "JSON values" in done.stderr, done.stderr
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak RSS {peak_mb} MB"


def test_the_exit_code_comes_from_the_findings_not_the_document(hostile: Hostile) -> None:
    text = run_tcpwatch(hostile.ns, "check", "--from", hostile.url("lying"))
    assert text.returncode == 2, text.stderr
    assert text.stdout.startswith("TCPWATCH CRITICAL - 1 critical"), text.stdout
    report = run_tcpwatch(hostile.ns, "check", "--from", hostile.url("lying"), "--format", "json")
    assert report.returncode == 2, report.stderr
    document = json.loads(report.stdout)
    assert (document["status"], document["exit_code"]) == ("CRITICAL", 2)
    assert document["summary"] == {"critical": 1, "warning": 0, "info": 0}
    good = run_tcpwatch(hostile.ns, "check", "--from", hostile.url("good"))
    assert good.returncode == 2 and good.stdout.startswith("TCPWATCH CRITICAL"), good.stderr
    top = run_tcpwatch(hostile.ns, "top", "-b", "--from", hostile.url("lying"))
    assert top.returncode == 0 and "status   CRITICAL - 1 critical" in top.stdout, top.stdout


def test_a_nul_and_escapes_reach_neither_curses_nor_the_terminal(hostile: Hostile) -> None:
    batch = run_tcpwatch(hostile.ns, "top", "-b", "--from", hostile.url("nul"))
    assert batch.returncode == 0, batch.stderr
    assert f"{SHOWN_NAME}[1234]" in batch.stdout and f"full ({SHOWN_NAME})" in batch.stdout
    assert all(line.isprintable() for line in batch.stdout.splitlines())
    check = run_tcpwatch(hostile.ns, "check", "--from", hostile.url("nul"))
    assert check.returncode == 2 and f"full ({SHOWN_NAME})" in check.stdout, check.stderr
    assert all(line.isprintable() for line in check.stdout.splitlines())

    argv = hostile.ns.exec_argv(sys.executable, "-m", "tcpwatch", "top", "-d", "1", "--from",
                                hostile.url("nul"))  # fmt: skip
    rc_file = Path(tcpwatch_env().get("TMPDIR", "/tmp")) / f"tw-top-nul-{PORT}.rc"
    rc_file.unlink(missing_ok=True)
    inner = " ".join(shlex.quote(a) for a in argv) + f"; echo $? > {rc_file}"
    env = {"PYTHONPATH": str(REPO_ROOT), "TERM": "screen-256color"}
    tmux = Tmux(f"sh -c {shlex.quote(inner)}", 150, 50, env)
    try:
        screen = tmux.wait(lambda t: f"{SHOWN_NAME}[1234]" in t and "FINDINGS" in t)
        assert "refresh failed" not in screen
        time.sleep(2.5)  # two more refreshes: still drawn, no crash
        assert tmux.alive() and f"{SHOWN_NAME}[1234]" in tmux.screen()
        tmux.keys("q")
        deadline = time.monotonic() + 10
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0"
    finally:
        tmux.close()
        rc_file.unlink(missing_ok=True)
