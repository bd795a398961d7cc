"""The daemon's memory across polls: CLOSE_WAIT first-seen times, the previous snapshot for
counter windows, per-source error counters, the poll histogram and rate-limited source logs.

Snapshots are built by hand; rules see them through a captured Window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import MappingProxyType

import pytest

from tcpwatch import audit
from tcpwatch.config import CollectSettings, Config, RuleOverride
from tcpwatch.daemon import describe, status_line
from tcpwatch.history import NetnsHistory, SourceFailureLog, track_close_wait
from tcpwatch.http.webconfig import WebConfig
from tcpwatch.model import (
    FAMILIES,
    STATES,
    Attribution,
    KernelCounters,
    PersistedSysctl,
    ProcessRef,
    Snapshot,
    SocketTable,
    SockStat,
    SourceStatus,
    Sysctls,
)
from tcpwatch.pipeline import Pipeline as Poller
from tcpwatch.rules import Finding, RuleSettings, Window
from tcpwatch.sources.registry import source_names
from tcpwatch.state import POLL_BUCKETS


def make_snapshot(
    netns: str = "host",
    taken_at: float = 1000.0,
    close_wait: Iterable[int] = (),
    failing: Sequence[str] = (),
    overflows: int = 0,
    track_close_wait_states: bool = True,
    owner: ProcessRef | None = None,
) -> Snapshot:
    """A small snapshot: ``close_wait`` inodes (held by ``owner``), ``failing`` sources absent."""
    inodes = frozenset(close_wait)
    counts = {family: dict.fromkeys(STATES, 0) for family in FAMILIES}
    counts["ipv4"]["close_wait"] = len(inodes)
    counts["ipv4"]["established"] = 7
    sockets = SocketTable(
        counts=counts,
        listeners=(),
        ephemeral_use=(),
        syn_sent=(),
        self_connects=(),
        inodes_by_state={"close_wait": inodes} if track_close_wait_states else {},
        established_method="derived",
        messages=1,
    )
    owners = dict.fromkeys(inodes, owner) if owner is not None else {}
    statuses = tuple(
        SourceStatus(name, name not in failing, 0.001, f"{name} broke" if name in failing else None)
        for name in source_names()
    )
    return Snapshot(
        netns=netns,
        taken_at=taken_at,
        sockets=None if "sockdiag" in failing else sockets,
        counters=None
        if "counters" in failing
        else KernelCounters({"TcpExtListenOverflows": overflows, "TcpExtListenDrops": overflows}),
        sockstat=None if "sockstat" in failing else SockStat(7, 0, 0, 0, 7, 1),
        sysctls=None if "sysctl" in failing else Sysctls({"net.core.somaxconn": (4096,)}),
        attribution=None
        if "processes" in failing
        else Attribution(MappingProxyType(owners), processes_scanned=3, complete=True),
        sources=statuses,
    )


class Scripted:
    """A `take` for Poller: returns the next prepared list of snapshots on each poll."""

    def __init__(self, *polls: Sequence[Snapshot]) -> None:
        self._polls = list(polls)
        self.configs: list[Config] = []

    def __call__(self, config: Config) -> Sequence[Snapshot]:
        self.configs.append(config)
        return self._polls.pop(0)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Window, dict[str, RuleSettings]]]:
    """Every Window (and settings) the poller hands the rule engine; no findings come back."""
    seen: list[tuple[Window, dict[str, RuleSettings]]] = []

    def capture(window: Window, settings: dict[str, RuleSettings]) -> list[Finding]:
        seen.append((window, dict(settings)))
        return []

    monkeypatch.setattr(audit, "evaluate", capture)
    return seen


# -- CLOSE_WAIT tracking ---------------------------------------------------------------------------


def test_close_wait_first_seen_is_kept_new_ones_start_gone_ones_drop() -> None:
    first = track_close_wait({}, make_snapshot(taken_at=100.0, close_wait=[11, 12]))
    assert first == {11: 100.0, 12: 100.0}
    second = track_close_wait(first, make_snapshot(taken_at=115.0, close_wait=[12, 13]))
    assert second == {12: 100.0, 13: 115.0}  # 11 closed; 12 keeps its first sighting
    third = track_close_wait(second, make_snapshot(taken_at=130.0, close_wait=[]))
    assert third == {}


def test_close_wait_history_survives_a_failed_socket_dump() -> None:
    before = {12: 100.0}
    assert track_close_wait(before, make_snapshot(failing=["sockdiag"])) == before


def test_close_wait_untracked_means_no_history_and_inode_zero_is_ignored() -> None:
    untracked = make_snapshot(close_wait=[5], track_close_wait_states=False)
    assert track_close_wait({5: 1.0}, untracked) == {}
    assert track_close_wait({}, make_snapshot(taken_at=9.0, close_wait=[0, 5])) == {5: 9.0}


# -- the poller ------------------------------------------------------------------------------------


def test_windows_carry_previous_snapshot_and_close_wait_ages(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    first = make_snapshot(taken_at=100.0, close_wait=[1, 2], overflows=3)
    second = make_snapshot(taken_at=115.0, close_wait=[2, 3], overflows=10)
    poller = Poller(take=Scripted([first], [second]), clock=Clock())
    poller.poll(Config())
    poller.poll(Config())
    (w1, _), (w2, _) = windows
    assert w1.previous is None and w1.current is first
    assert w1.close_wait_first_seen == {1: 100.0, 2: 100.0}
    assert w2.previous is first and w2.current is second
    assert w2.close_wait_first_seen == {2: 100.0, 3: 115.0}
    assert w2.seconds == 15.0
    assert w2.counter_delta("TcpExtListenOverflows") == 7
    assert poller.history("host") == NetnsHistory((first, second), {2: 100.0, 3: 115.0})


def test_history_is_per_namespace_and_forgets_vanished_ones(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    host1, blue1 = make_snapshot("host", 100.0, [1]), make_snapshot("blue", 100.0, [1])
    host2 = make_snapshot("host", 115.0, [1])
    blue3 = make_snapshot("blue", 130.0, [1])
    poller = Poller(take=Scripted([host1, blue1], [host2], [blue3]))
    for _ in range(3):
        poller.poll(Config())
    by_poll = [(w.current.netns, w.previous, dict(w.close_wait_first_seen)) for w, _ in windows]
    assert by_poll == [
        ("host", None, {1: 100.0}),
        ("blue", None, {1: 100.0}),
        ("host", host1, {1: 100.0}),
        ("blue", None, {1: 130.0}),  # blue was gone for a poll: its history went with it
    ]


def test_settings_and_persisted_sysctls_reach_the_rules(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    persisted = (PersistedSysctl("/etc/sysctl.conf", 3, "net.ipv4.tcp_tw_recycle", "1"),)
    config = Config(rules={"Q01": RuleOverride(False), "S01": RuleOverride(True, {"warning": 5.0})})
    host = replace(make_snapshot(), persisted_sysctls=persisted)
    Poller(take=Scripted([host])).poll(config)
    ((window, settings),) = windows
    assert window.persisted_sysctls == persisted
    assert settings == {
        "Q01": RuleSettings(enabled=False, thresholds={}),
        "S01": RuleSettings(enabled=True, thresholds={"warning": 5.0}),
    }


def test_the_hosts_sysctl_files_judge_only_the_host_namespace(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    # The host-wide source puts the same lines in every snapshot; the files set the host's
    # tunables, so a pod's namespace is not judged against them.
    persisted = (PersistedSysctl("/etc/sysctl.conf", 3, "net.ipv4.tcp_tw_recycle", "1"),)
    polled = [
        replace(make_snapshot(name), persisted_sysctls=persisted) for name in ("host", "blue")
    ]
    Poller(take=Scripted(polled)).poll(Config())
    assert [(w.current.netns, w.persisted_sysctls) for w, _ in windows] == [
        ("host", persisted),
        ("blue", ()),
    ]


def test_no_persisted_lines_when_the_sysctl_files_source_failed(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    Poller(take=Scripted([make_snapshot(failing=["sysctl_files"])])).poll(Config())
    assert windows[0][0].persisted_sysctls == ()


def test_export_state_is_cached_timed_and_counts_errors(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    timer = Clock(0.0)
    clock = Clock(5000.0)

    def take(config: Config) -> Sequence[Snapshot]:
        timer.now += 0.03  # each poll takes 30 ms
        return script(config)

    script = Scripted(
        [make_snapshot(failing=["counters"])],
        [make_snapshot(failing=["counters", "processes"])],
        [make_snapshot()],
    )
    poller = Poller(take=take, clock=clock, timer=timer)
    config = Config(collect=CollectSettings(top_processes=3, top_destinations=4))
    states = []
    for _ in range(3):
        states.append(poller.poll(config))
        clock.now += 15
    assert [dict(s.source_errors) for s in states] == [
        {("host", "counters"): 1},
        {("host", "counters"): 2, ("host", "processes"): 1},
        {("host", "counters"): 2, ("host", "processes"): 1},  # counters never go back
    ]
    last = states[-1]
    assert last.cached is True
    assert last.last_poll == 5030.0
    assert (last.top_processes, last.top_destinations) == (3, 4)
    assert sum(last.poll_durations.counts) == 3
    assert last.poll_durations.total == pytest.approx(0.09)
    assert last.poll_durations.counts[POLL_BUCKETS.index(0.05)] == 3
    # Each state is a value: the first one still shows one error after later polls.
    assert dict(states[0].source_errors) == {("host", "counters"): 1}


def test_error_counters_of_a_vanished_namespace_are_dropped(
    windows: list[tuple[Window, dict[str, RuleSettings]]],
) -> None:
    poller = Poller(
        take=Scripted(
            [make_snapshot("blue", failing=["sysctl"]), make_snapshot("host")],
            [make_snapshot("host")],
        ),
    )
    assert dict(poller.poll(Config()).source_errors) == {("blue", "sysctl"): 1}
    assert dict(poller.poll(Config()).source_errors) == {}


def test_findings_of_every_namespace_are_published() -> None:
    # The real rule engine on a snapshot with a CLOSE_WAIT pile held by one process.
    owner = ProcessRef(4321, "leaky")
    config = Config(rules={"S01": RuleOverride(True, {"warning": 3.0})})
    poller = Poller(
        take=Scripted(
            [
                make_snapshot("host", close_wait=[1, 2, 3, 4], owner=owner),
                make_snapshot("blue", close_wait=[9], owner=owner),
            ]
        ),
    )
    state = poller.poll(config)
    assert [(f.rule_id, f.netns, f.subject) for f in state.findings if f.rule_id == "S01"] == [
        ("S01", "host", "leaky")
    ]
    assert [s.netns for s in state.snapshots] == ["host", "blue"]


# -- rate-limited source logs ----------------------------------------------------------------------


def test_failing_source_logged_first_then_rarely_then_on_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(0.0)
    failures = SourceFailureLog(repeat_seconds=300.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="tcpwatch.daemon")
    broken = make_snapshot(failing=["counters"])
    for _ in range(20):  # 20 polls, 15 s apart: 285 s, under the repeat interval
        failures.record([broken])
        clock.now += 15
    assert [r.getMessage() for r in caplog.records] == [
        "source counters in netns host failed: counters broke (its metrics are absent and "
        "tcpwatch_source_up is 0; repeated at most every 300 s)"
    ]
    caplog.clear()
    failures.record([broken])  # at 300 s
    assert [r.getMessage() for r in caplog.records] == [
        "source counters in netns host still failing (21 polls in a row, 20 since the last "
        "line): counters broke"
    ]
    assert failures.failing() == {("host", "counters"): "counters broke"}
    caplog.clear()
    clock.now += 15
    failures.record([make_snapshot()])
    failures.record([make_snapshot()])
    assert [r.getMessage() for r in caplog.records] == [
        "source counters in netns host recovered after 21 failed polls"
    ]
    assert failures.failing() == {}


def test_sources_fail_and_recover_independently_per_namespace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = SourceFailureLog(clock=Clock(0.0))
    caplog.set_level(logging.WARNING, logger="tcpwatch.daemon")
    failures.record([make_snapshot("host", failing=["sysctl"]), make_snapshot("blue")])
    failures.record([make_snapshot("host"), make_snapshot("blue", failing=["sysctl"])])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "source sysctl in netns host failed",
        "source sysctl in netns host recovered after 1 failed poll",
        "source sysctl in netns blue failed",
    ]


def test_a_source_that_stops_running_is_forgotten_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = SourceFailureLog(clock=Clock(0.0))
    failures.record([make_snapshot(failing=["processes"])])
    caplog.clear()
    # process attribution switched off by a reload: no status for it any more
    no_processes = make_snapshot()
    no_processes = replace(
        no_processes, sources=tuple(s for s in no_processes.sources if s.name != "processes")
    )
    failures.record([no_processes])
    assert failures.failing() == {}
    assert caplog.records == []


# -- small pieces ----------------------------------------------------------------------------------


def test_status_line() -> None:
    state = Poller(
        take=Scripted([make_snapshot(failing=["counters"], close_wait=[1, 2, 3, 4])]),
    ).poll(Config(rules={"S01": RuleOverride(True, {"warning": 1.0, "critical": 1.0})}))
    findings = len(state.findings)
    assert findings >= 1
    line = status_line(state, 15.0)
    assert line.startswith(f"polling every 15s; {findings} finding")
    assert line.endswith("; 1 source failing")


def test_describe_names_what_an_operator_changes() -> None:
    config = Config(
        interval=30.0,
        collect=CollectSettings(process_attribution=False),
        rules={"Q03": RuleOverride(False), "S01": RuleOverride(True, {"warning": 5.0})},
    )
    assert describe(config, WebConfig()) == (
        "polling self every 30 s, no process attribution, 1 rules disabled (Q03), 1 thresholds "
        "set; web: plain HTTP"
    )
