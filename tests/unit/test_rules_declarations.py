"""Rules declare what they read, and the registry is built from those declarations.

Every rule runs over the scenarios that drive each branch (tests/unit/test_rules_docs.py) with
sysctls and kernel counters that record which names are looked up: a rule reading a sysctl or a
counter it does not declare would silently miss it when the sysctl source stops reading it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from types import ModuleType

import pytest

from tcpwatch.model import KernelCounters, Snapshot, Sysctls
from tcpwatch.rules import RULES, SYSCTLS_USED, Rule, Window, evaluate, sort_key
from tcpwatch.rules.base import rule
from tcpwatch.rules.shapes import ratio_severity
from tests.unit.snapshots import RuleInfo
from tests.unit.test_rules_docs import scenarios, scenarios_of_rule_tests

RESERVED = "net.ipv4.ip_local_reserved_ports"


class Recording(Mapping[str, object]):
    """A read-only mapping that notes every name looked up in it."""

    def __init__(self, data: Mapping[str, object], seen: set[str]) -> None:
        self._data = dict(data)
        self._seen = seen

    def __getitem__(self, key: str) -> object:
        self._seen.add(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        self._seen.add(str(key))
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("a rule must look sysctls and counters up by name")

    def __len__(self) -> int:
        return len(self._data)


class RecordingRanges(tuple[tuple[int, int], ...]):
    """ip_local_reserved_ports as ranges; iterating them counts as reading that sysctl."""

    seen: set[str]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.seen.add(RESERVED)
        return super().__iter__()


def recording(snapshot: Snapshot | None, sysctls: set[str], counters: set[str]) -> Snapshot | None:
    if snapshot is None:
        return None
    new_sysctls = None
    if snapshot.sysctls is not None:
        ranges = RecordingRanges(snapshot.sysctls.reserved_ports)
        ranges.seen = sysctls
        new_sysctls = Sysctls(
            values=Recording(snapshot.sysctls.values, sysctls),  # type: ignore[arg-type]
            reserved_ports=ranges,
        )
    new_counters = None
    if snapshot.counters is not None:
        new_counters = KernelCounters(
            values=Recording(snapshot.counters.values, counters)  # type: ignore[arg-type]
        )
    return replace(snapshot, sysctls=new_sysctls, counters=new_counters)


def reads(rule_under_test: Rule) -> tuple[set[str], set[str]]:
    """(sysctls, counters) the rule looked up over every scenario."""
    sysctls: set[str] = set()
    counters: set[str] = set()
    for win, settings in [*scenarios(), *scenarios_of_rule_tests()]:
        current = recording(win.current, sysctls, counters)
        assert current is not None
        recorded = Window(
            current,
            recording(win.previous, sysctls, counters),
            win.close_wait_first_seen,
            win.persisted_sysctls,
        )
        findings = evaluate(recorded, settings, (rule_under_test,))
        assert all("could not run" not in f.title for f in findings), findings
    return sysctls, counters


@pytest.mark.parametrize("rule_under_test", RULES, ids=[r.id for r in RULES])
def test_each_rule_declares_exactly_the_sysctls_and_counters_it_reads(
    rule_under_test: Rule,
) -> None:
    sysctls, counters = reads(rule_under_test)
    assert sysctls == set(rule_under_test.sysctls), rule_under_test.id
    assert counters == set(rule_under_test.counters), rule_under_test.id
    assert len(set(rule_under_test.sysctls)) == len(rule_under_test.sysctls)


def test_sysctls_used_is_the_sorted_union_of_the_declarations() -> None:
    union = {name for r in RULES for name in r.sysctls}
    assert tuple(sorted(union)) == SYSCTLS_USED
    assert "net.ipv4.tcp_syncookies" in SYSCTLS_USED and RESERVED in SYSCTLS_USED


def test_the_decorator_makes_the_function_name_the_rule() -> None:
    @rule("Z09", "made-here", "info", "A rule declared in a test", sysctls=("net.core.somaxconn",))
    def Z09(window: Window, thresholds: Mapping[str, float | None]) -> Iterator[object]:
        yield Z09.finding(window, "seen", {"n": 1}, "# nothing")

    assert isinstance(Z09, Rule)
    assert (Z09.id, Z09.slug, Z09.doc) == ("Z09", "made-here", "docs/rules/Z09-made-here.md")
    assert Z09.sysctls == ("net.core.somaxconn",) and Z09.counters == ()
    [win, _] = scenarios()[0]
    [finding] = evaluate(win, {}, (Z09,))
    assert (finding.rule_id, finding.severity, finding.netns) == ("Z09", "info", win.current.netns)


def test_collect_finds_each_rule_once_and_refuses_two_with_one_id() -> None:
    from tcpwatch.rules import collect

    k01, q01 = (next(r for r in RULES if r.id == rule_id) for rule_id in ("K01", "Q01"))
    first, second = ModuleType("first"), ModuleType("second")
    first.K01 = k01  # type: ignore[attr-defined]
    second.again = k01  # type: ignore[attr-defined]  # imported elsewhere: same object
    second.Q01 = q01  # type: ignore[attr-defined]
    assert collect([first, second]) == (k01, q01)
    clash = ModuleType("clash")
    clash.K01 = replace(k01, title="another rule, same id")  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="two rules are declared with the id K01"):
        collect([first, clash])


def test_ratio_severity_gates_on_warning_first() -> None:
    limits = {"warning": 0.5, "critical": 0.8}
    assert ratio_severity(0.49, limits) is None
    assert ratio_severity(0.5, limits) == "warning"
    assert ratio_severity(0.8, limits) == "critical"


def test_one_order_everywhere_severity_then_namespace_then_rule_then_subject() -> None:
    [win, _] = scenarios()[0]
    make = RuleInfo("K05", "somaxconn-low", "warning", "t").finding
    other = replace(win, current=replace(win.current, netns="a-netns"))
    findings = [
        make(win, "x", {}, "", subject="b"),
        make(other, "x", {}, "", subject="z"),
        make(win, "x", {}, "", subject="a", severity="critical"),
        RuleInfo("K01", "syncookies-disabled", "warning", "t").finding(win, "x", {}, ""),
    ]
    ordered = sorted(findings, key=sort_key)
    assert [(f.severity, f.netns, f.rule_id, f.subject) for f in ordered] == [
        ("critical", "host", "K05", "a"),
        ("warning", "a-netns", "K05", "z"),
        ("warning", "host", "K01", ""),
        ("warning", "host", "K05", "b"),
    ]
