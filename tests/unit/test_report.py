"""The check report: text (plain and coloured) and the JSON schema, on built findings."""

from __future__ import annotations

import json
import re

import pytest

from tcpwatch.model import ProcessRef, Snapshot
from tcpwatch.render.json import SCHEMA_VERSION, findings_from_json, render_json
from tcpwatch.render.text import render_text, summary_line
from tcpwatch.rules import Finding, evaluate
from tests.unit.snapshots import (
    NGINX,
    T0,
    T1,
    counters_plus,
    listener,
    snapshot,
    socket_table,
    window,
)

ANSI = re.compile(r"\033\[[0-9;]*m")
LEAKY = ProcessRef(55, "leaky")


def troubled() -> tuple[list[Finding], list[Snapshot]]:
    """A namespace with a full accept queue, overflows, a CLOSE_WAIT leak and an info finding."""
    table = socket_table(
        [listener(8080, queue_length=129, queue_max=128, inode=7001)],
        close_wait_inodes=range(1, 61),
    )
    owners = {7001: NGINX} | {inode: LEAKY for inode in range(1, 61)}
    start = snapshot(taken_at=T0, sockets=table, owners=owners)
    end = snapshot(
        sockets=table,
        owners=owners,
        counters=counters_plus({"TcpExtListenOverflows": 20, "TcpExtListenDrops": 20}),
        sysctl_overrides={"net.ipv4.tcp_fin_timeout": (30,)},
        failed_sources={"processes": "permission denied"},
    )
    return evaluate(window(end, start), {}), [end]


def test_summary_line_is_nagios_style() -> None:
    findings, _ = troubled()
    assert summary_line(findings) == "TCPWATCH CRITICAL - 1 critical, 2 warning, 1 info"
    assert summary_line([]) == "TCPWATCH OK - no findings"
    info_only = [f for f in findings if f.severity == "info"]
    assert summary_line(info_only) == "TCPWATCH OK - 1 info"
    warnings = [f for f in findings if f.severity == "warning"]
    assert summary_line(warnings) == "TCPWATCH WARNING - 2 warning"


def test_plain_text_groups_by_severity_with_evidence_fix_and_doc() -> None:
    findings, snapshots = troubled()
    text = render_text(findings, snapshots, color=False)
    assert not ANSI.search(text)
    lines = text.splitlines()
    assert lines[0] == "TCPWATCH CRITICAL - 1 critical, 2 warning, 1 info"
    assert lines[1].startswith(
        "netns host: snapshot at 2023-11-14 22:13:25 UTC, sources 4 ok, 1 failed"
    )
    assert lines[2] == (
        "! source processes failed in netns host (0.001 s): permission denied; "
        "rules that need it were skipped"
    )
    headers = [line for line in lines if re.fullmatch(r"(CRITICAL|WARNING|INFO) \(\d+\)", line)]
    assert headers == ["CRITICAL (1)", "WARNING (2)", "INFO (1)"]
    q01 = lines.index(
        "  [Q01 accept-queue-full] accept queue full on 0.0.0.0:8080: 129 of 128 (nginx[1234])"
    )
    block = "\n".join(lines[q01 : q01 + 20])
    assert "    subject     0.0.0.0:8080" in block
    assert re.search(r"evidence    listener +0\.0\.0\.0:8080", block)
    assert re.search(r"\n {16}queue_length +129", block)
    assert "    fix         # nginx[1234] is not calling accept() fast enough" in block
    # No published docs by default: the page is where every install has it (issue 22 item 1).
    assert "    doc         tcpwatch rules Q01\n" in block + "\n"
    published = render_text(findings, snapshots, color=False, docs_url="https://docs.internal/tw")
    assert (
        "    doc         https://docs.internal/tw/docs/rules/Q01-accept-queue-full.md "
        "(offline: tcpwatch rules Q01)"
    ) in published
    assert lines.index("CRITICAL (1)") < q01 < lines.index("WARNING (2)") < lines.index("INFO (1)")
    # One namespace: its name is in the header, not repeated per finding.
    assert "    netns" not in text


def test_colour_text_has_the_same_words_with_ansi_styles() -> None:
    findings, snapshots = troubled()
    coloured = render_text(findings, snapshots, color=True)
    plain = render_text(findings, snapshots, color=False)
    assert ANSI.sub("", coloured) == plain
    assert coloured.startswith("\033[1;31mTCPWATCH CRITICAL")
    assert "\033[1;33mWARNING (2)\033[0m" in coloured
    ok = render_text([], [snapshot()], color=True)
    assert ok.startswith("\033[1;32mTCPWATCH OK - no findings\033[0m\n")


def test_text_groups_findings_by_namespace_when_there_are_several() -> None:
    host = snapshot(sysctl_overrides={"net.core.somaxconn": (1024,)})
    other = snapshot(netns="tw-7", sysctl_overrides={"net.core.somaxconn": (4096,)})
    findings = evaluate(window(host), {}) + evaluate(window(other), {})
    text = render_text(findings, [host, other], color=False)
    host_section = text.index("== netns host: TCPWATCH WARNING - 1 warning")
    other_section = text.index("== netns tw-7: TCPWATCH OK")
    k05 = text.index("[K05 somaxconn-low]")
    assert host_section < k05 < other_section
    assert text.count("[K05 somaxconn-low]") == 1
    assert "netns tw-7: snapshot at" in text


def test_info_findings_are_one_line_unless_verbose() -> None:
    tuned = snapshot(sysctl_overrides={"net.ipv4.tcp_fin_timeout": (30,)})
    findings = evaluate(window(tuned), {})
    assert [f.rule_id for f in findings] == ["K10"]
    short = render_text(findings, [tuned], color=False)
    assert "[K10 fin-timeout-misread]" in short
    assert short.rstrip().endswith("TIME_WAIT stays 60 s  tcpwatch rules K10"), short
    site = render_text(findings, [tuned], color=False, docs_url="https://docs.internal/tw/")
    assert site.rstrip().endswith(
        "  https://docs.internal/tw/docs/rules/K10-fin-timeout-misread.md"
    )
    assert "    fix " not in short
    assert "    fix " in render_text(findings, [tuned], color=False, verbose=True)


def test_json_schema_fields_and_values() -> None:
    findings, snapshots = troubled()
    document = json.loads(render_json(findings, snapshots, 5.0))
    assert list(document) == [
        "schema_version",
        "status",
        "exit_code",
        "summary",
        "window_seconds",
        "namespaces",
        "findings",
        "gauges",
        "sources",
    ]
    assert set(document["gauges"]) == {"accept_queue_fill", "close_wait", "time_wait", "orphans"}
    assert document["schema_version"] == SCHEMA_VERSION == 2
    assert (document["status"], document["exit_code"]) == ("CRITICAL", 2)
    assert document["summary"] == {"critical": 1, "warning": 2, "info": 1}
    assert document["window_seconds"] == 5.0
    assert document["namespaces"] == [
        {"netns": "host", "taken_at": T1, "listeners": 1, "sockets": 73}
    ]
    first = document["findings"][0]
    assert list(first) == [
        "id",
        "slug",
        "severity",
        "title",
        "netns",
        "subject",
        "evidence",
        "remediation",
        "doc",
        "doc_url",
    ]
    assert first["id"] == "Q01" and first["severity"] == "critical"
    assert first["evidence"]["queue_length"] == 129
    assert first["evidence"]["process"] == "nginx" and first["evidence"]["pid"] == 1234
    assert [f["id"] for f in document["findings"]] == ["Q01", "Q02", "S01", "K10"]
    failed = [s for s in document["sources"] if not s["ok"]]
    assert failed == [
        {
            "netns": "host",
            "name": "processes",
            "ok": False,
            "duration_seconds": 0.001,
            "error": "permission denied",
            "skipped": [],
        }
    ]
    assert all(s["error"] is None for s in document["sources"] if s["ok"])


def test_json_round_trips_to_equal_findings() -> None:
    findings, snapshots = troubled()
    text = render_json(findings, snapshots, 5.0)
    back = findings_from_json(text)
    assert back == findings
    assert [dict(f.evidence) for f in back] == [dict(f.evidence) for f in findings]


def test_json_of_a_healthy_host_is_ok_with_no_findings() -> None:
    document = json.loads(render_json([], [snapshot()], 0.0))
    assert (document["status"], document["exit_code"], document["findings"]) == ("OK", 0, [])


def test_findings_from_json_refuses_another_schema_version() -> None:
    with pytest.raises(ValueError, match="schema_version: 3 is not"):
        findings_from_json(json.dumps({"schema_version": 3, "findings": []}))


def test_a_version_1_report_is_read_with_version_2_keys() -> None:
    """Reports saved before the snake_case keys still load (check --from), keys renamed."""
    findings, snapshots = troubled()
    document = json.loads(render_json(findings, snapshots, 5.0))
    q02 = next(f for f in document["findings"] if f["id"] == "Q02")
    v2_keys = list(q02["evidence"])
    assert "listen_overflows_in_window" in v2_keys
    q02["evidence"] = {
        ("TcpExtListenOverflows_in_window" if key == "listen_overflows_in_window" else key): value
        for key, value in q02["evidence"].items()
    }
    document["schema_version"] = 1
    back = findings_from_json(json.dumps(document))
    assert back == findings
    assert list(next(f for f in back if f.rule_id == "Q02").evidence) == v2_keys
