"""Q rules on built snapshots: accept queues, listen overflows, capped backlogs, SYN queues."""

from __future__ import annotations

from tcpwatch.model import ProcessRef
from tcpwatch.rules import Finding, RuleSettings, evaluate
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
