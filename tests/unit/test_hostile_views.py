"""Host strings with escape sequences, newlines and NUL in every text view: the check report
(text and --emit-sysctl), the top screen (batch and curses lines), and the CLI's error line.
Each is compared with the same view of plain names: same lines, names escaped in place."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from tcpwatch.cli import main
from tcpwatch.model import PersistedSysctl, ProcessRef
from tcpwatch.render import api
from tcpwatch.render.sysctl_snippet import render_sysctl_snippet
from tcpwatch.render.text import render_text
from tcpwatch.rules import Finding, evaluate
from tcpwatch.state import ExportState
from tcpwatch.top.screen import Line, View, fit, layout
from tests.unit.snapshots import T1, listener, snapshot, socket_table, window

ATTACK = "x\nrm -rf ~;#"
SCREEN = "\x1b[2J\x1b]0;t\x07"
NETNS = "blue\x1b[31m\x00"


def _controls(text: str) -> set[str]:
    return {c for c in text if not c.isprintable() and c != "\n"}


def _state(listener_name: str, leaker: str, netns: str) -> ExportState:
    table = socket_table(
        [listener(8080, queue_length=129, queue_max=128, inode=7001)],
        close_wait_inodes=range(1, 61),
    )
    owners = {7001: ProcessRef(11, listener_name)} | dict.fromkeys(
        range(1, 61), ProcessRef(12, leaker)
    )
    current = snapshot(
        netns=netns,
        sockets=table,
        owners=owners,
        sysctl_overrides={"net.core.somaxconn": (128,)},
        failed_sources={"counters": f"cannot read /proc/net/{SCREEN}"},
    )
    persisted = (PersistedSysctl(f"/etc/sysctl.d/{ATTACK}", 1, "net.core.somaxconn", "64"),)
    findings = evaluate(window(current, persisted=persisted), {})
    return ExportState((current,), tuple(findings), last_poll=T1, interval=5.0)


HOSTILE = _state(ATTACK, SCREEN, NETNS)
# The plain names have no program-specific advice (nginx would add a worker_connections line).
PLAIN = _state("webapp", "leaky", "blue")


def test_the_text_report_escapes_every_name_and_keeps_its_lines() -> None:
    for verbose in (False, True):
        ours = render_text(HOSTILE.findings, HOSTILE.snapshots, False, verbose)
        plain = render_text(PLAIN.findings, PLAIN.snapshots, False, verbose)
        assert not _controls(ours)
        assert len(ours.splitlines()) == len(plain.splitlines())
        assert not any(line.lstrip().startswith("rm") for line in ours.splitlines())
        assert "x\\nrm -rf ~;#[11] is not calling accept()" in ours
        assert "netns blue\\x1b[31m\\x00: snapshot" in ours
        assert "/proc/net/\\x1b[2J\\x1b]0;t\\x07" in ours
    coloured = render_text(HOSTILE.findings, HOSTILE.snapshots, True)
    # The report's own colours are the only escape sequences left.
    assert {c for c in coloured if not c.isprintable()} == {"\n", "\x1b"}
    assert "\x1b[2J" not in coloured and "\x07" not in coloured


def test_the_sysctl_snippet_cannot_gain_a_line() -> None:
    ours = render_sysctl_snippet(HOSTILE.findings)
    assert not _controls(ours)
    settings = [ln for ln in ours.splitlines() if ln.strip() and not ln.startswith("#")]
    plain = render_sysctl_snippet(PLAIN.findings)
    assert settings == [ln for ln in plain.splitlines() if ln.strip() and not ln.startswith("#")]


def test_the_top_screen_escapes_names_and_nul() -> None:
    snapshot_doc = api.snapshot_document(HOSTILE, api.SnapshotQuery(limit=10))
    findings_doc = api.findings_document(HOSTILE, None, 100)
    for width in (60, 200):
        lines = layout(snapshot_doc, findings_doc, View(source="test"), width)
        screen = fit(lines, width, 80)
        for line in [*lines, *screen]:
            assert line.text.isprintable() and len(line.text) <= width, line
    wide = "\n".join(line.text for line in layout(snapshot_doc, findings_doc, View(), 200))
    assert "x\\nrm -rf ~;#[11]" in wide and "\\x1b[2J\\x1b]0;t\\x07[12]" in wide
    assert "netns blue\\x1b[31m\\x00" in wide
    # A refresh error (the curses loop adds it above the layout) is escaped by fit too.
    (problem,) = fit([Line("a\x00\x1b")], 20, 1)
    assert problem.text == "a\\x00\\x1b"


def test_a_usage_error_quoting_a_name_is_one_escaped_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The namespace asked for is quoted back as it was given: escaped, on one line.
    code = main(["check", "--netns", "nosuch\x1b[2J\nx", "--window", "0"])
    _, err = capsys.readouterr()
    assert code == 3 and err.count("\n") == 1 and "\x1b" not in err, err
    assert 'matched "nosuch\\x1b[2J\\nx"' in err


def test_printable_findings_keep_their_values() -> None:
    from tcpwatch.render.printable import printable_finding

    finding = Finding(
        "Q01", "accept-queue-full", "critical", f"full ({ATTACK})", "host", "x",
        MappingProxyType({"process": ATTACK, "pid": 11}), "# a\rb\x0bc\x85d\u2028\nss -ltn",
        "docs/x.md",
    )  # fmt: skip
    shown = printable_finding(finding)
    assert shown.title == "full (x\\nrm -rf ~;#)"
    assert shown.evidence == {"process": "x\\nrm -rf ~;#", "pid": 11}
    # The fix keeps its own lines (a rule escapes names as it writes them: fixes.comment); the
    # other characters str.splitlines() breaks at are escaped, so they start no line.
    assert shown.remediation.splitlines() == ["# a\\rb\\x0bc\\u0085d\\u2028", "ss -ltn"]
