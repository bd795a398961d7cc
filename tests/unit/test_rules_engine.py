"""The rule registry and engine: catalogue, settings, failure isolation, ordering, exit codes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpwatch.rules import (
    ERROR_SEVERITY,
    RULES,
    Finding,
    Rule,
    RuleSettings,
    Thresholds,
    Window,
    evaluate,
    rule_by_id,
    worst_exit_code,
)
from tests.unit.snapshots import RuleInfo, counters_plus, snapshot, window

REPO = Path(__file__).resolve().parents[2]

# Every rule released so far, with its slug: ids and slugs are public (config keys, the
# tcpwatch_finding labels, docs/rules/ pages), so none may disappear or be renamed (issue 3). The
# one place rule ids are pinned; other tests read them from the registry. A new rule need not be
# added here to pass, only to be protected.
RELEASED = {
    "C01": "connect-failures",
    "C02": "retransmissions",
    "C03": "listener-client-quality",
    "K01": "syncookies-disabled",
    "K02": "syncookies-forced",
    "K03": "tw-recycle-enabled",
    "K04": "abort-on-overflow",
    "K05": "somaxconn-low",
    "K06": "timewait-buckets",
    "K07": "orphans-near-limit",
    "K08": "port-range",
    "K09": "keepalive-vs-idle-timeout",
    "K10": "fin-timeout-misread",
    "K11": "tcp-memory-pressure",
    "Q01": "accept-queue-full",
    "Q02": "listen-overflows",
    "Q03": "backlog-capped",
    "Q04": "syn-queue-pressure",
    "Q05": "listener-owner-near-fd-limit",
    "S01": "close-wait-leak",
    "S02": "self-connect",
    "S03": "syn-sent-pileup",
    "P01": "ephemeral-exhaustion",
    "P02": "listener-in-ephemeral-range",
}


def test_catalogue_keeps_every_released_rule_with_its_slug_in_id_order() -> None:
    current = {rule.id: rule.slug for rule in RULES}
    assert {rule_id: current.get(rule_id) for rule_id in RELEASED} == RELEASED
    ids = [rule.id for rule in RULES]
    assert ids == sorted(ids)
    for rule in RULES:
        assert rule.doc == f"docs/rules/{rule.id}-{rule.slug}.md"
        assert rule.severity in ("info", "warning", "critical")
        assert rule.title and not rule.title.endswith(".")


def test_every_rule_has_its_documentation_page_naming_each_threshold_key() -> None:
    index = (REPO / "docs" / "rules" / "README.md").read_text()
    for rule in RULES:
        page = (REPO / rule.doc).read_text()
        assert page.startswith(f"# {rule.id} {rule.slug}"), rule.doc
        for heading in ("## What it detects", "## Why it matters", "## How to fix", "## Verify"):
            assert heading in page, f"{rule.doc} lacks {heading}"
        for threshold in rule.thresholds:
            assert f"`rules.{rule.id}.{threshold.name}`" in page, (rule.doc, threshold.name)
        assert f"[{rule.id}]({rule.id}-{rule.slug}.md)" in index


def test_thresholds_have_defaults_inside_their_bounds_and_unique_names() -> None:
    for rule in RULES:
        names = [t.name for t in rule.thresholds]
        assert len(names) == len(set(names)), rule.id
        for threshold in rule.thresholds:
            assert re.fullmatch(r"[a-z_]+", threshold.name)
            assert threshold.minimum <= threshold.maximum
            if threshold.default is not None:
                assert threshold.minimum <= threshold.default <= threshold.maximum, (
                    rule.id,
                    threshold.name,
                )
            assert threshold.unit and threshold.description


def test_issue_defaults_are_the_thresholds_defaults() -> None:
    def default(rule_id: str, name: str) -> float | None:
        rule = rule_by_id(rule_id)
        assert rule is not None
        return next(t.default for t in rule.thresholds if t.name == name)

    assert default("K05", "minimum") == 4096
    assert default("K06", "usage") == 0.9
    assert (default("K07", "warning"), default("K07", "critical")) == (0.25, 0.5)
    assert default("K08", "minimum_ports") == 10000
    assert default("K09", "idle_timeout") is None
    assert (default("Q01", "warning"), default("Q01", "critical")) == (0.8, 1.0)
    assert default("Q04", "warning") == 0.8
    assert default("S01", "warning") == 50
    assert (default("P01", "warning"), default("P01", "critical")) == (0.5, 0.8)
    assert (default("K11", "critical")) == 0.9
    assert default("C01", "minimum_attempts") == 10
    assert (default("C01", "warning"), default("C01", "critical")) == (0.1, 0.5)
    assert (default("C02", "warning"), default("C02", "critical")) == (0.02, 0.1)
    assert default("C03", "rtt_seconds") == 0.25


def test_rule_by_id() -> None:
    rule = rule_by_id("Q01")
    assert rule is not None and rule.slug == "accept-queue-full"
    assert rule_by_id("Z99") is None


def test_a_healthy_default_host_has_no_finding_at_all() -> None:
    assert evaluate(window(snapshot()), {}) == []
    start = snapshot()
    end = snapshot(taken_at=start.taken_at + 5)
    assert evaluate(window(end, start), {}) == []


def test_rules_yield_nothing_when_every_source_failed() -> None:
    broken = snapshot(
        sockets=None,
        counters=None,
        stat=None,
        owners=None,
        no_sysctls=True,
        failed_sources={name: "boom" for name in ("sysctl", "sockstat", "counters", "sockdiag")},
    )
    assert evaluate(window(broken, broken), {}) == []


def _raising(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    yield RuleInfo("Z01", "half-way", "info", "yields one, then fails").finding(
        window, "partial", {}, ""
    )
    raise ZeroDivisionError("division by zero")


def test_a_raising_rule_becomes_one_error_finding_and_the_others_still_run() -> None:
    broken = Rule("Z01", "half-way", "info", "Yields one then fails", (), _raising, "docs/x.md")
    rules = (*RULES[:3], broken, *RULES[3:])
    current = snapshot(sysctl_overrides={"net.core.somaxconn": (128,)})
    findings = evaluate(window(current), {}, rules)
    errors = [f for f in findings if f.rule_id == "Z01"]
    assert len(errors) == 1  # its partial finding is dropped
    error = errors[0]
    assert error.severity == ERROR_SEVERITY == "warning"
    assert error.evidence["error"] == "ZeroDivisionError: division by zero"
    assert "could not run" in error.title and error.netns == "host"
    assert error.doc == "docs/x.md"
    assert any(f.rule_id == "K05" for f in findings)  # rules after it still ran


def test_disabled_rules_do_not_run_and_overrides_reach_the_check() -> None:
    current = snapshot(sysctl_overrides={"net.core.somaxconn": (1024,)})
    assert [f.rule_id for f in evaluate(window(current), {})] == ["K05"]
    assert evaluate(window(current), {"K05": RuleSettings(enabled=False)}) == []
    lowered = {"K05": RuleSettings(thresholds={"minimum": 1024})}
    assert evaluate(window(current), lowered) == []
    raised = {"K05": RuleSettings(thresholds={"minimum": 8192, "unknown": 3})}
    (finding,) = evaluate(window(snapshot()), raised)
    assert finding.evidence["minimum"] == 8192


def test_findings_are_sorted_critical_first_then_id_then_subject() -> None:
    start = snapshot()
    end = snapshot(
        taken_at=start.taken_at + 5,
        sysctl_overrides={"net.ipv4.tcp_fin_timeout": (30,), "net.core.somaxconn": (1024,)},
        counters=counters_plus({"TcpExtListenOverflows": 3, "TcpExtListenDrops": 3}),
    )
    findings = evaluate(window(end, start), {"K09": RuleSettings(thresholds={"idle_timeout": 350})})
    assert [(f.severity, f.rule_id) for f in findings] == [
        ("warning", "K05"),
        ("warning", "K09"),
        ("warning", "Q02"),
        ("info", "K10"),
    ]


def test_worst_exit_code_follows_nagios() -> None:
    def finding(severity: str) -> Finding:
        return Finding("K05", "x", severity, "t", "host", "", {}, "", "d")  # type: ignore[arg-type]

    assert worst_exit_code([]) == 0
    assert worst_exit_code([finding("info")]) == 0
    assert worst_exit_code([finding("info"), finding("warning")]) == 1
    assert worst_exit_code([finding("warning"), finding("critical"), finding("info")]) == 2


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [(10, 15, 5), (10, 10, 0), (10, 4, None)],
)
def test_counter_delta(before: int, after: int, expected: int | None) -> None:
    start = snapshot(counters={"TcpExtListenDrops": before})
    end = snapshot(counters={"TcpExtListenDrops": after}, taken_at=start.taken_at + 2)
    assert window(end, start).counter_delta("TcpExtListenDrops") == expected
    assert window(end, start).counter_delta("TcpExtMissing") is None
    assert window(end).counter_delta("TcpExtListenDrops") is None
    assert window(end, start).seconds == 2
