"""Q02 on built snapshots: drops per listener (sk_drops over the window), their cause, and the
namespace-wide rest."""

from __future__ import annotations

from dataclasses import replace

from tcpwatch.model import KernelCounters, Listener
from tcpwatch.rules import Finding, RuleSettings, Window, evaluate
from tests.unit.snapshots import (
    NGINX,
    T0,
    counters_plus,
    listener,
    snapshot,
    socket_table,
    window,
)


def only(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule_id]


# Q02 -----------------------------------------------------------------------------------------


def test_q02_overflows_during_the_window() -> None:
    table = socket_table([listener(8080, queue_length=129, queue_max=128, inode=7001)])
    start = snapshot(taken_at=T0, sockets=table, owners={7001: NGINX})
    end = snapshot(
        sockets=table,
        owners={7001: NGINX},
        counters=counters_plus({"TcpExtListenOverflows": 20, "TcpExtListenDrops": 20}),
    )
    (finding,) = only(evaluate(window(end, start), {}), "Q02")
    assert finding.severity == "warning"
    assert finding.evidence["listen_overflows_in_window"] == 20
    assert finding.evidence["listen_drops_in_window"] == 20
    assert finding.evidence["window_seconds"] == 5.0
    assert finding.evidence["drops_per_second"] == 4.0
    assert finding.evidence["listeners_full_now"] == "0.0.0.0:8080 nginx[1234]"
    # The kernel reported no per-listener drops here: the namespace's counters speak.
    assert finding.evidence["unaccounted_in_window"] == 20
    assert finding.subject == ""


def test_q02_silent_without_growth_or_without_a_window() -> None:
    grown = counters_plus({"TcpExtListenOverflows": 20, "TcpExtListenDrops": 20})
    steady = window(snapshot(counters=grown), snapshot(taken_at=T0, counters=grown))
    assert only(evaluate(steady, {}), "Q02") == []
    assert only(evaluate(window(snapshot(counters=grown)), {}), "Q02") == []
    higher = {"Q02": RuleSettings(thresholds={"minimum": 50})}
    moving = window(snapshot(counters=grown), snapshot(taken_at=T0))
    assert only(evaluate(moving, higher), "Q02") == []
    assert len(only(evaluate(moving, {}), "Q02")) == 1


def dropping(
    port: int,
    drops: int | None,
    queue_length: int = 12,
    queue_max: int = 32,
    inode: int = 7001,
    syn_recv: int = 0,
) -> Listener:
    return replace(
        listener(port, "127.0.0.1", queue_length, queue_max, syn_recv, inode), drops=drops
    )


def drop_window(
    before: list[Listener], after: list[Listener], overflows: int | None, drops: int | None
) -> Window:
    owners = {lsn.inode: NGINX for lsn in before + after}
    grown: dict[str, int] = {}
    if overflows is not None:
        grown["TcpExtListenOverflows"] = overflows
    if drops is not None:
        grown["TcpExtListenDrops"] = drops
    return window(
        snapshot(sockets=socket_table(after), owners=owners, counters=counters_plus(grown)),
        snapshot(taken_at=T0, sockets=socket_table(before), owners=owners),
    )


def test_q02_names_the_listener_that_dropped_even_when_its_queue_looks_empty() -> None:
    # nginx with a backlog of 32 under load: 2353 SYNs dropped between the polls, while its
    # queue reads 12 of 32 at this one.
    win = drop_window([dropping(8080, 7962)], [dropping(8080, 10315)], 2353, 2353)
    (finding,) = only(evaluate(win, {}), "Q02")
    assert finding.subject == "127.0.0.1:8080"
    evidence = finding.evidence
    assert (evidence["listener"], evidence["process"], evidence["pid"]) == (
        "127.0.0.1:8080",
        "nginx",
        1234,
    )
    assert evidence["drops_in_window"] == 2353 and evidence["drops_total"] == 10315
    assert evidence["cause"] == "accept"
    assert (evidence["queue_length"], evidence["queue_max"]) == (12, 32)
    assert evidence["drops_per_second"] == round(2353 / 5, 3)
    assert finding.title == (
        "2353 connection attempts dropped at 127.0.0.1:8080 (nginx[1234]) in 5.0 s: its accept "
        "queue (32) overflowed, though it reads 12 now: it drains and refills between polls"
    )
    assert "worker_connections" in finding.remediation
    assert "ss -ltnm 'sport = :8080'" in finding.remediation
    assert "listen 8080 backlog=4096;" in finding.remediation
    # Every drop is accounted for by the listener: no namespace-wide finding besides it.
    assert [f.subject for f in only(evaluate(win, {}), "Q02")] == ["127.0.0.1:8080"]


def test_q02_only_the_listeners_that_dropped() -> None:
    before = [dropping(8080, 100, inode=1), dropping(9090, 5, inode=2)]
    after = [dropping(8080, 150, inode=1), dropping(9090, 5, inode=2), dropping(7070, 3, inode=3)]
    findings = only(evaluate(drop_window(before, after, 53, 53), {}), "Q02")
    # 7070 is new since the window started: all of its drops happened in it.
    assert {f.subject: f.evidence["drops_in_window"] for f in findings} == {
        "127.0.0.1:7070": 3,
        "127.0.0.1:8080": 50,
    }
    raised = {"Q02": RuleSettings(thresholds={"minimum": 10})}
    raised_findings = only(evaluate(drop_window(before, after, 53, 53), raised), "Q02")
    assert [f.subject for f in raised_findings] == ["127.0.0.1:8080"]


def test_q02_syn_queue_drops_are_not_blamed_on_accept() -> None:
    # A SYN flood: ListenDrops grew, ListenOverflows did not.
    win = drop_window(
        [dropping(8080, 0, syn_recv=129)], [dropping(8080, 21000, syn_recv=129)], 0, 21000
    )
    (finding,) = only(evaluate(win, {}), "Q02")
    assert finding.evidence["cause"] == "syn"
    assert "accept() faster" not in finding.remediation
    assert "SYN queue" in finding.title and "Q04" in finding.remediation
    assert "ss -tn state syn-recv 'sport = :8080'" in finding.remediation


def test_q02_namespace_only_for_drops_no_listener_accounts_for() -> None:
    # 30 dropped, 20 of them at the listener still here: 10 at 9090, which closed meanwhile.
    before = [dropping(8080, 0, inode=1), dropping(9090, 5, inode=2)]
    win = drop_window(before, [dropping(8080, 20, inode=1)], 30, 30)
    by_subject = {f.subject: f for f in only(evaluate(win, {}), "Q02")}
    assert set(by_subject) == {"127.0.0.1:8080", ""}
    rest = by_subject[""].evidence
    assert (rest["unaccounted_in_window"], rest["drops_at_listeners_in_window"]) == (10, 20)
    # Every listener still here and reporting: a difference is the moment between the two
    # reads of a poll (counters, then the dump), not a listener tcpwatch missed.
    win = drop_window([dropping(8080, 0)], [dropping(8080, 20)], 30, 30)
    assert [f.subject for f in only(evaluate(win, {}), "Q02")] == ["127.0.0.1:8080"]
    # The listener's own counter can exceed ListenDrops (other drops at the socket).
    win = drop_window(before, [dropping(8080, 40, inode=1)], 30, 30)
    assert [f.subject for f in only(evaluate(win, {}), "Q02")] == ["127.0.0.1:8080"]


def test_q02_listener_drops_without_namespace_counters() -> None:
    win = drop_window([dropping(8080, 0)], [dropping(8080, 7)], None, None)
    (finding,) = only(evaluate(win, {}), "Q02")
    assert finding.subject == "127.0.0.1:8080" and finding.evidence["cause"] == "unknown"


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """Windows with drops counted per listener (for the rule pages' evidence tables)."""
    q04 = drop_window(
        [dropping(8080, 0, syn_recv=129)], [dropping(8080, 500, syn_recv=129)], 0, 500
    )
    q04 = replace(
        q04,
        current=replace(
            q04.current,
            counters=KernelCounters(
                counters_plus({"TcpExtTCPReqQFullDoCookies": 500, "TcpExtSyncookiesSent": 500})
            ),
        ),
    )
    return [
        (drop_window([dropping(8080, 7962)], [dropping(8080, 10315)], 2353, 2353), {}),
        (
            drop_window(
                [dropping(8080, 0, 33, 32, inode=1), dropping(9090, 0, inode=2)],
                [dropping(8080, 20, 33, 32, inode=1)],
                30,
                30,
            ),
            {},
        ),
        (q04, {}),
    ]
