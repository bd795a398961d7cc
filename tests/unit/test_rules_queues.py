"""Q rules on built snapshots: accept queues, listen overflows, capped backlogs, SYN queues."""

from __future__ import annotations

from dataclasses import replace

from tcpwatch.model import Listener, ProcessRef
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

APP = ProcessRef(4321, "app-server")


def only(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule_id]


# Q01 -----------------------------------------------------------------------------------------


def test_q01_full_queue_is_critical_and_names_listener_and_process() -> None:
    table = socket_table([listener(8080, queue_length=129, queue_max=128, inode=7001)])
    current = snapshot(sockets=table, owners={7001: NGINX})
    (finding,) = only(evaluate(window(current), {}), "Q01")
    assert finding.severity == "critical"
    assert finding.subject == "0.0.0.0:8080"
    assert finding.evidence["listener"] == "0.0.0.0:8080"
    assert finding.evidence["queue_length"] == 129
    assert finding.evidence["queue_max"] == 128
    assert finding.evidence["process"] == "nginx"
    assert finding.evidence["pid"] == 1234
    assert "nginx[1234]" in finding.title
    assert "listen 8080 backlog=4096;" in finding.remediation
    # The app's own backlog (128) limits it, not somaxconn (4096): no sysctl change proposed.
    assert "somaxconn" not in finding.remediation.replace("# ", "")
    assert "ss -ltnm 'sport = :8080'" in finding.remediation
    assert "worker_connections" in finding.remediation  # why nginx in particular stops


def test_q01_warning_at_80_percent_and_somaxconn_advice_when_capped() -> None:
    table = socket_table([listener(9000, "::", queue_length=3300, queue_max=4096, inode=7002)])
    current = snapshot(sockets=table, owners={7002: APP})
    (finding,) = only(evaluate(window(current), {}), "Q01")
    assert finding.severity == "warning"
    assert finding.subject == "[::]:9000"
    assert finding.evidence["fill_ratio"] == round(3300 / 4096, 4)
    assert "sysctl -w net.core.somaxconn=8192" in finding.remediation
    assert "listen(fd, 8192)" in finding.remediation


def test_q01_reuseport_group_is_one_finding_about_its_fullest_socket() -> None:
    table = socket_table(
        [
            listener(443, queue_length=0, queue_max=511, inode=1, socket_index=0),
            listener(443, queue_length=511, queue_max=511, inode=2, socket_index=1),
        ]
    )
    current = snapshot(sockets=table, owners={1: NGINX, 2: ProcessRef(1240, "nginx")})
    (finding,) = only(evaluate(window(current), {}), "Q01")
    assert finding.evidence["pid"] == 1240
    assert finding.evidence["reuseport_sockets"] == 2
    assert finding.evidence["reuseport_sockets_at_threshold"] == 1


def test_q01_unknown_owner_and_window_start_length() -> None:
    full = socket_table([listener(8080, queue_length=5, queue_max=5, inode=7001)])
    start = snapshot(taken_at=T0, sockets=full, owners={})
    end = snapshot(sockets=full, owners={})
    (finding,) = only(evaluate(window(end, start), {}), "Q01")
    assert finding.evidence["process"] == "unknown"
    assert "pid" not in finding.evidence
    assert finding.evidence["queue_length_at_window_start"] == 5
    assert "unknown process" in finding.title


def test_q01_silent_below_80_percent_on_empty_queues_and_with_higher_thresholds() -> None:
    table = socket_table(
        [listener(8080, queue_length=100, queue_max=128), listener(8081, queue_max=0)]
    )
    assert only(evaluate(window(snapshot(sockets=table)), {}), "Q01") == []
    assert only(evaluate(window(snapshot()), {}), "Q01") == []
    full = socket_table([listener(8080, queue_length=110, queue_max=128)])
    relaxed = {"Q01": RuleSettings(thresholds={"warning": 0.9})}
    assert only(evaluate(window(snapshot(sockets=full)), relaxed), "Q01") == []


def test_q01_silent_without_sockets() -> None:
    assert only(evaluate(window(snapshot(sockets=None)), {}), "Q01") == []


# Q02 -----------------------------------------------------------------------------------------


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
    # 30 dropped, 20 of them at the listener still here: 10 at one that closed meanwhile.
    win = drop_window([dropping(8080, 0)], [dropping(8080, 20)], 30, 30)
    by_subject = {f.subject: f for f in only(evaluate(win, {}), "Q02")}
    assert set(by_subject) == {"127.0.0.1:8080", ""}
    rest = by_subject[""].evidence
    assert (rest["unaccounted_in_window"], rest["drops_at_listeners_in_window"]) == (10, 20)
    # The listener's own counter can exceed ListenDrops (other drops at the socket): no rest.
    win = drop_window([dropping(8080, 0)], [dropping(8080, 40)], 30, 30)
    assert [f.subject for f in only(evaluate(win, {}), "Q02")] == ["127.0.0.1:8080"]


def test_q02_listener_drops_without_namespace_counters() -> None:
    win = drop_window([dropping(8080, 0)], [dropping(8080, 7)], None, None)
    (finding,) = only(evaluate(win, {}), "Q02")
    assert finding.subject == "127.0.0.1:8080" and finding.evidence["cause"] == "unknown"


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


# Q03 -----------------------------------------------------------------------------------------


def test_q03_capped_backlog_is_silent_while_the_queue_is_calm() -> None:
    # Go servers and listen(fd, -1) ask for exactly somaxconn: indistinguishable from a cut.
    calm = socket_table([listener(8080, queue_length=10, queue_max=4096, inode=7001)])
    assert only(evaluate(window(snapshot(sockets=calm, owners={7001: APP})), {}), "Q03") == []


def test_q03_names_process_and_fix_under_pressure() -> None:
    table = socket_table([listener(8080, queue_length=3000, queue_max=4096, inode=7001)])
    (finding,) = only(evaluate(window(snapshot(sockets=table, owners={7001: APP})), {}), "Q03")
    assert finding.severity == "warning"
    assert finding.evidence["somaxconn"] == 4096
    assert finding.evidence["process"] == "app-server"
    assert "sysctl -w net.core.somaxconn=8192" in finding.remediation


def test_q03_capped_backlog_under_pressure_is_a_warning() -> None:
    table = socket_table([listener(8080, queue_length=60, queue_max=100, inode=7001)])
    current = snapshot(
        sockets=table, owners={7001: APP}, sysctl_overrides={"net.core.somaxconn": (100,)}
    )
    (finding,) = only(evaluate(window(current), {}), "Q03")
    assert finding.severity == "warning"
    assert "60% full" in finding.title


def test_q03_silent_when_the_backlog_is_below_somaxconn() -> None:
    assert only(evaluate(window(snapshot()), {}), "Q03") == []
    assert only(evaluate(window(snapshot(no_sysctls=True)), {}), "Q03") == []


# Q04 -----------------------------------------------------------------------------------------


def test_q04_syn_queue_at_80_percent_of_the_backlog() -> None:
    table = socket_table([listener(8080, queue_max=128, syn_recv=110, inode=7001)])
    (finding,) = only(evaluate(window(snapshot(sockets=table, owners={7001: APP})), {}), "Q04")
    assert finding.severity == "warning"
    assert finding.subject == "0.0.0.0:8080"
    assert finding.evidence["syn_recv"] == 110
    assert finding.evidence["syn_queue_limit"] == 128
    assert finding.evidence["tcp_syncookies"] == 1
    assert "tcp_syncookies=1" not in finding.remediation  # already on


def test_q04_uses_the_no_cookie_limit_when_syncookies_are_off() -> None:
    table = socket_table([listener(8080, queue_max=4096, syn_recv=80)])
    current = snapshot(
        sockets=table,
        sysctl_overrides={
            "net.ipv4.tcp_syncookies": (0,),
            "net.ipv4.tcp_max_syn_backlog": (128,),
        },
    )
    (finding,) = only(evaluate(window(current), {}), "Q04")
    assert finding.evidence["syn_queue_limit"] == 96
    assert "sysctl -w net.ipv4.tcp_syncookies=1" in finding.remediation


def test_q04_counters_cookies_are_a_warning_and_drops_critical() -> None:
    start = snapshot(taken_at=T0)
    cookies = snapshot(
        counters=counters_plus({"TcpExtTCPReqQFullDoCookies": 30, "TcpExtSyncookiesSent": 30})
    )
    (finding,) = only(evaluate(window(cookies, start), {}), "Q04")
    assert finding.severity == "warning"
    assert finding.subject == ""
    assert finding.evidence["syncookies_sent_in_window"] == 30
    drops = snapshot(counters=counters_plus({"TcpExtTCPReqQFullDrop": 4}))
    (finding,) = only(evaluate(window(drops, start), {}), "Q04")
    assert finding.severity == "critical"
    assert finding.evidence["tcp_req_q_full_drop_in_window"] == 4


def test_q04_ignores_cookie_counters_when_cookies_are_forced() -> None:
    forced = {"net.ipv4.tcp_syncookies": (2,)}
    start = snapshot(taken_at=T0, sysctl_overrides=forced)
    end = snapshot(sysctl_overrides=forced, counters=counters_plus({"TcpExtSyncookiesSent": 500}))
    assert only(evaluate(window(end, start), {}), "Q04") == []


def test_q04_silent_on_a_calm_host() -> None:
    table = socket_table([listener(8080, queue_max=128, syn_recv=10)])
    assert only(evaluate(window(snapshot(sockets=table), snapshot(taken_at=T0)), {}), "Q04") == []


def test_q01_proposes_raising_somaxconn_when_the_suggested_backlog_would_be_cut() -> None:
    table = socket_table([listener(8080, "127.0.0.1", queue_length=5, queue_max=4, inode=7001)])
    current = snapshot(sockets=table, owners={}, sysctl_overrides={"net.core.somaxconn": (512,)})
    (finding,) = only(evaluate(window(current), {}), "Q01")
    assert "sysctl -w net.core.somaxconn=4096" in finding.remediation
    assert "listen(fd, 4096)" in finding.remediation
    assert "# the owning process is not calling accept() fast enough" in finding.remediation


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """Windows with drops counted per listener (for the rule pages' evidence tables)."""
    q04 = drop_window(
        [dropping(8080, 0, syn_recv=129)], [dropping(8080, 500, syn_recv=129)], 0, 500
    )
    q04 = replace(
        q04,
        current=replace(
            q04.current,
            counters=counters_plus(
                {"TcpExtTCPReqQFullDoCookies": 500, "TcpExtSyncookiesSent": 500}
            ),
        ),
    )
    return [
        (drop_window([dropping(8080, 7962)], [dropping(8080, 10315)], 2353, 2353), {}),
        (drop_window([dropping(8080, 0, 33, 32)], [dropping(8080, 20, 33, 32)], 30, 30), {}),
        (q04, {}),
    ]
