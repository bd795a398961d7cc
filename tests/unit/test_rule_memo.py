"""RuleMemo: a rule's findings are reused only when it provably read nothing that changed and
nothing about time; windows rolling over and sockets growing old still show at once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tcpwatch.audit import RuleMemo, audit
from tcpwatch.config import Config
from tcpwatch.model import NetnsIdentity, Snapshot
from tcpwatch.pipeline import Pipeline
from tcpwatch.rules import RULES, Finding, RuleSettings, Thresholds, Window, evaluate
from tcpwatch.rules.base import rule
from tests.unit.snapshots import DEFAULT_COUNTERS, DEFAULT_OWNERS, NGINX, T0, socket_table, window
from tests.unit.snapshots import snapshot as make


class Scripted:
    def __init__(self, snapshots: list[Snapshot]) -> None:
        self._snapshots: Iterator[Snapshot] = iter(snapshots)

    def __call__(self, config: Config) -> tuple[Snapshot, ...]:
        return (next(self._snapshots),)


def _at(taken_at: float, **kwargs: object) -> Snapshot:
    return replace(make(taken_at=taken_at, **kwargs), identity=NetnsIdentity(inode=7))  # type: ignore[arg-type]


def test_a_window_rolling_over_clears_a_finding_while_the_snapshots_stay_equal() -> None:
    """Listen overflows rise once, then nothing moves: every later snapshot holds the same data,
    yet Q02 must fire while the rise is inside the 5 s window and clear once it rolled out."""
    risen = {**DEFAULT_COUNTERS, "TcpExtListenOverflows": 40, "TcpExtListenDrops": 40}
    snapshots = [_at(T0)] + [_at(T0 + second, counters=risen) for second in range(1, 12)]
    pipeline = Pipeline(take=Scripted(snapshots), clock=lambda: 0.0)
    config = replace(Config(), interval=1, rules_window=5)
    fired = [any(f.rule_id == "Q02" for f in pipeline.poll(config).findings) for _ in snapshots]
    assert fired == [False] + [True] * 5 + [False] * 6


def test_close_wait_sockets_growing_stale_turn_critical_with_nothing_else_changing() -> None:
    """60 CLOSE_WAIT sockets held by nginx, the same in every poll: S01 warns at once and turns
    critical once they were seen 300 s (its time-dependent part is never taken from a memo)."""
    inodes = range(9000, 9060)
    owners = {**DEFAULT_OWNERS, **dict.fromkeys(inodes, NGINX)}
    table = socket_table(close_wait_inodes=inodes)
    snapshots = [_at(T0 + 30 * step, sockets=table, owners=owners) for step in range(13)]
    pipeline = Pipeline(take=Scripted(snapshots), clock=lambda: 0.0)
    config = replace(Config(), interval=30)
    severities = []
    for _ in snapshots:
        s01 = [f.severity for f in pipeline.poll(config).findings if f.rule_id == "S01"]
        severities.append(s01[0] if s01 else None)
    assert severities[0] == "warning"
    assert "critical" in severities
    first_critical = severities.index("critical")
    assert severities[:first_critical] == ["warning"] * first_critical
    assert severities[first_critical:] == ["critical"] * (len(severities) - first_critical)
    assert 30 * first_critical >= 300


def test_the_memo_finds_what_every_rule_run_afresh_finds_poll_after_poll() -> None:
    memo = RuleMemo()
    polls = [
        _at(T0),
        _at(T0 + 1),  # equal data: reused where the rule allows
        _at(T0 + 2, sysctl_overrides={"net.ipv4.tcp_syncookies": (0,)}),  # K01 fires
        _at(T0 + 3, sysctl_overrides={"net.ipv4.tcp_syncookies": (0,)}),
        _at(T0 + 4, sysctl_overrides={"net.core.somaxconn": (128,)}),  # K01 clears, K05?
        _at(T0 + 5, sockets=socket_table(close_wait_inodes=range(100, 160))),
    ]
    previous: Snapshot | None = None
    settings: dict[str, RuleSettings] = {}
    for current in polls:
        expected = evaluate(window(current, previous), settings)
        assert memo.evaluate(window(current, previous), settings) == expected
        previous = current
    k01 = [any(f.rule_id == "K01" for f in memo.evaluate(window(p), {})) for p in polls[1:4]]
    assert k01 == [False, True, True]


def test_rules_reading_only_unchanged_data_are_not_run_again_and_one_change_runs_them() -> None:
    memo = RuleMemo()
    memo.evaluate(window(_at(T0)), {})
    first = memo.runs
    assert first == len(RULES)
    memo.evaluate(window(_at(T0 + 1), _at(T0)), {})
    reused = len(RULES) - (memo.runs - first)
    assert reused >= 10  # the kernel-setting rules (K01-K05, K08-K10, P02, Q03, S02 ...)
    # one sysctl changed: the rules that read the sysctls run again and see it
    runs = memo.runs
    findings = memo.evaluate(
        window(_at(T0 + 2, sysctl_overrides={"net.ipv4.tcp_syncookies": (0,)}), _at(T0 + 1)), {}
    )
    assert memo.runs - runs > len(RULES) - reused
    assert any(f.rule_id == "K01" for f in findings)

    # a changed threshold runs its rule again, whatever the data
    def at(second: int) -> Snapshot:
        return _at(T0 + second, sysctl_overrides={"net.ipv4.tcp_syncookies": (0,)})

    memo.evaluate(window(at(3), at(2)), {})
    runs = memo.runs
    memo.evaluate(window(at(4), at(3)), {})
    steady = memo.runs - runs
    memo.evaluate(window(at(5), at(4)), {"K05": RuleSettings(thresholds={"minimum": 8192})})
    assert memo.runs - runs - steady == steady + 1
    same = at(6)
    # a disabled rule finds nothing, reused or not
    off = {"K01": RuleSettings(enabled=False)}
    assert not any(f.rule_id == "K01" for f in memo.evaluate(window(same), off))


def test_a_rule_that_reads_the_time_is_run_on_every_poll() -> None:
    @rule("Z98", "clock", "info", "reads the snapshot's time")
    def clock(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
        if window.current.taken_at >= T0 + 10:
            yield clock.finding(window, "late", {}, "")

    @rule("Z99", "window", "info", "reads the window")
    def windowed(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
        if (window.seconds or 0) >= 10:
            yield windowed.finding(window, "long", {}, "")

    memo = RuleMemo(rules=(clock, windowed))
    start = _at(T0)
    ids = [
        [f.rule_id for f in memo.evaluate(window(_at(T0 + step), start), {})]
        for step in (1, 5, 10, 11)
    ]
    assert ids == [[], [], ["Z98", "Z99"], ["Z98", "Z99"]]
    assert memo.runs == 8


def test_audit_with_a_memo_forgets_namespaces_no_longer_polled() -> None:
    memo = RuleMemo()
    a, b = replace(_at(T0), netns="a"), replace(_at(T0), netns="b")
    both = audit([a, b], {}, {}, memo=memo)
    assert both == audit([a, b], {}, {})
    audit([a], {}, {}, memo=memo)
    runs = memo.runs
    audit([b], {}, {}, memo=memo)  # b was forgotten: every rule runs again
    assert memo.runs - runs == len(RULES)


def test_no_rule_reads_how_long_a_source_took() -> None:
    """The memo compares the sources' outcomes, not their durations (which change every poll):
    sound only while no rule reads a duration."""
    rules = Path(__file__).resolve().parents[2] / "tcpwatch" / "rules"
    assert not [p.name for p in rules.glob("*.py") if "duration_seconds" in p.read_text()]
