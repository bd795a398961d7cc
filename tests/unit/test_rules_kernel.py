"""K rules on built snapshots: each fires on its condition and stays silent without it."""

from __future__ import annotations

from collections.abc import Mapping

from tcpwatch.model import PersistedSysctl
from tcpwatch.rules import Finding, RuleSettings, evaluate
from tests.unit.snapshots import (
    T0,
    counters_plus,
    listener,
    snapshot,
    socket_table,
    sockstat,
    window,
)


def only(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule_id]


def run(
    rule_id: str,
    overrides: Mapping[str, tuple[int, ...] | None] | None = None,
    settings: Mapping[str, RuleSettings] | None = None,
) -> list[Finding]:
    current = snapshot(sysctl_overrides=overrides)
    return only(evaluate(window(current), settings or {}), rule_id)


# K01 -----------------------------------------------------------------------------------------


def test_k01_warns_when_syncookies_are_off_and_nothing_is_dropped() -> None:
    (finding,) = run("K01", {"net.ipv4.tcp_syncookies": (0,)})
    assert finding.severity == "warning"
    assert finding.evidence["tcp_syncookies"] == 0
    assert finding.evidence["tcp_max_syn_backlog"] == 2048
    assert "sysctl -w net.ipv4.tcp_syncookies=1" in finding.remediation
    assert "/etc/sysctl.d/90-tcpwatch-tcp-syncookies.conf" in finding.remediation
    assert finding.doc == "docs/rules/K01-syncookies-disabled.md"


def test_k01_is_critical_while_syn_queue_drops_grow() -> None:
    off = {"net.ipv4.tcp_syncookies": (0,)}
    start = snapshot(taken_at=T0, sysctl_overrides=off)
    end = snapshot(sysctl_overrides=off, counters=counters_plus({"TcpExtTCPReqQFullDrop": 7}))
    (finding,) = only(evaluate(window(end, start), {}), "K01")
    assert finding.severity == "critical"
    assert finding.evidence["tcp_req_q_full_drop_in_window"] == 7
    assert finding.evidence["window_seconds"] == 5.0


def test_k01_is_critical_when_a_listener_is_past_the_no_cookie_limit() -> None:
    # tcp_max_syn_backlog 128: unproven peers are dropped past 128 - 32 = 96 request sockets.
    table = socket_table([listener(8080, queue_max=4096, syn_recv=96)])
    current = snapshot(
        sysctl_overrides={"net.ipv4.tcp_syncookies": (0,), "net.ipv4.tcp_max_syn_backlog": (128,)},
        sockets=table,
    )
    (finding,) = only(evaluate(window(current), {}), "K01")
    assert finding.severity == "critical"
    assert finding.evidence["listeners_dropping_syns"] == "0.0.0.0:8080 (96)"


def test_k01_silent_with_syncookies_on_or_unknown() -> None:
    assert run("K01") == []
    assert run("K01", {"net.ipv4.tcp_syncookies": (2,)}) == []
    assert run("K01", {"net.ipv4.tcp_syncookies": None}) == []


# K02 -----------------------------------------------------------------------------------------


def test_k02_fires_on_forced_cookies_only() -> None:
    (finding,) = run("K02", {"net.ipv4.tcp_syncookies": (2,)})
    assert finding.severity == "warning"
    assert "sysctl -w net.ipv4.tcp_syncookies=1" in finding.remediation
    assert run("K02") == []
    assert run("K02", {"net.ipv4.tcp_syncookies": (0,)}) == []


# K03 -----------------------------------------------------------------------------------------


def test_k03_is_critical_when_the_kernel_has_tw_recycle_on() -> None:
    (finding,) = run("K03", {"net.ipv4.tcp_tw_recycle": (1,)})
    assert finding.severity == "critical"
    assert "sysctl -w net.ipv4.tcp_tw_recycle=0" in finding.remediation
    assert run("K03", {"net.ipv4.tcp_tw_recycle": (0,)}) == []


def test_k03_reports_leftover_lines_as_info_on_a_kernel_without_it() -> None:
    persisted = (
        PersistedSysctl("/etc/sysctl.conf", 12, "net.ipv4.tcp_tw_recycle", "1"),
        PersistedSysctl("/etc/sysctl.conf", 30, "net.ipv4.tcp_tw_recycle", "0"),
        PersistedSysctl("/etc/sysctl.d/10-net.conf", 2, "net.core.somaxconn", "4096"),
    )
    findings = evaluate(window(snapshot(), persisted=persisted), {})
    (finding,) = only(findings, "K03")
    assert finding.severity == "info"
    assert finding.evidence["persisted_lines"] == (
        "/etc/sysctl.conf:12 (net.ipv4.tcp_tw_recycle = 1), "
        "/etc/sysctl.conf:30 (net.ipv4.tcp_tw_recycle = 0)"
    )
    assert (
        "sed -i -e '12s/^/# tcp_tw_recycle was removed in Linux 4.12: /' "
        "-e '30s/^/# tcp_tw_recycle was removed in Linux 4.12: /' /etc/sysctl.conf"
    ) in finding.remediation
    # Host files do not apply to other namespaces: no duplicate there.
    assert only(evaluate(window(snapshot(netns="tw-x"), persisted=persisted), {}), "K03") == []


def test_k03_silent_without_leftovers_or_sysctls() -> None:
    assert run("K03") == []
    assert only(evaluate(window(snapshot(no_sysctls=True)), {}), "K03") == []


# K04 -----------------------------------------------------------------------------------------


def test_k04_abort_on_overflow() -> None:
    (finding,) = run("K04", {"net.ipv4.tcp_abort_on_overflow": (1,)})
    assert finding.severity == "warning"
    assert "sysctl -w net.ipv4.tcp_abort_on_overflow=0" in finding.remediation
    assert run("K04") == []


# K05 -----------------------------------------------------------------------------------------


def test_k05_low_somaxconn_names_capped_listeners() -> None:
    table = socket_table([listener(8080, queue_max=128), listener(9090, queue_max=64)])
    current = snapshot(sysctl_overrides={"net.core.somaxconn": (128,)}, sockets=table)
    (finding,) = only(evaluate(window(current), {}), "K05")
    assert finding.evidence["somaxconn"] == 128
    assert finding.evidence["listeners_at_somaxconn"] == 1
    assert finding.evidence["listeners_capped"] == "0.0.0.0:8080"
    assert "sysctl -w net.core.somaxconn=4096" in finding.remediation
    assert (
        "echo 'net.core.somaxconn = 4096' > /etc/sysctl.d/90-tcpwatch-somaxconn.conf"
        in finding.remediation
    )


def test_k05_silent_at_the_default_and_respects_its_threshold() -> None:
    assert run("K05") == []
    assert run("K05", {"net.core.somaxconn": (8192,)}) == []
    raised = {"K05": RuleSettings(thresholds={"minimum": 16384})}
    (finding,) = run("K05", {"net.core.somaxconn": (8192,)}, raised)
    assert "sysctl -w net.core.somaxconn=16384" in finding.remediation


def test_k05_remediation_in_a_named_namespace_and_with_an_overriding_file() -> None:
    persisted = (PersistedSysctl("/etc/sysctl.conf", 7, "net.core.somaxconn", "128"),)
    current = snapshot(sysctl_overrides={"net.core.somaxconn": (128,)})
    (host,) = only(evaluate(window(current, persisted=persisted), {}), "K05")
    assert "# /etc/sysctl.conf:7 sets net.core.somaxconn = 128" in host.remediation
    named = snapshot(netns="tw-1", sysctl_overrides={"net.core.somaxconn": (128,)})
    (finding,) = only(evaluate(window(named, persisted=persisted), {}), "K05")
    assert "ip netns exec tw-1 sysctl -w net.core.somaxconn=4096" in finding.remediation
    assert "/etc/sysctl.d/90" not in finding.remediation
    assert finding.netns == "tw-1"
    unnamed = snapshot(netns="ns:4026532384", sysctl_overrides={"net.core.somaxconn": (128,)})
    (finding,) = only(evaluate(window(unnamed), {}), "K05")
    assert (
        "nsenter -t $(lsns -n -o PID -t net 4026532384) --net sysctl -w net.core.somaxconn=4096"
        in finding.remediation
    )


# K06 -----------------------------------------------------------------------------------------


def test_k06_lowered_tw_buckets() -> None:
    (finding,) = run("K06", {"net.ipv4.tcp_max_tw_buckets": (5000,)})
    assert finding.evidence["kernel_default"] == 131072
    assert "lowered from the kernel default 131072" in str(finding.evidence["problems"])
    assert "sysctl -w net.ipv4.tcp_max_tw_buckets=131072" in finding.remediation


def test_k06_shared_table_in_a_child_namespace_gives_the_same_default() -> None:
    current = snapshot(
        netns="tw-2",
        sysctl_overrides={
            "net.ipv4.tcp_ehash_entries": (-262144,),
            "net.ipv4.tcp_max_tw_buckets": (131072,),
        },
    )
    assert only(evaluate(window(current), {}), "K06") == []


def test_k06_time_wait_at_90_percent() -> None:
    current = snapshot(
        sysctl_overrides={"net.ipv4.tcp_max_tw_buckets": (131072,)},
        stat=sockstat(time_wait=120_000),
    )
    (finding,) = only(evaluate(window(current), {}), "K06")
    assert finding.evidence["time_wait_sockets"] == 120_000
    assert finding.evidence["usage_ratio"] == round(120_000 / 131072, 4)
    assert "sysctl -w net.ipv4.tcp_max_tw_buckets=262144" in finding.remediation
    quiet = snapshot(stat=sockstat(time_wait=110_000))
    assert only(evaluate(window(quiet), {}), "K06") == []


def test_k06_timewait_overflow_growing() -> None:
    start = snapshot(taken_at=T0)
    end = snapshot(counters=counters_plus({"TcpExtTCPTimeWaitOverflow": 40}))
    (finding,) = only(evaluate(window(end, start), {}), "K06")
    assert finding.evidence["tcp_time_wait_overflow_in_window"] == 40
    # A counter that was already high but did not move is history, not a finding.
    old = counters_plus({"TcpExtTCPTimeWaitOverflow": 40})
    steady = window(snapshot(counters=old), snapshot(taken_at=T0, counters=old))
    assert only(evaluate(steady, {}), "K06") == []


def test_k06_silent_on_old_kernels_without_ehash_entries_at_the_default() -> None:
    assert run("K06", {"net.ipv4.tcp_ehash_entries": None}) == []
    assert run("K06") == []


# K07 -----------------------------------------------------------------------------------------


def test_k07_orphans_warning_and_critical() -> None:
    warn = snapshot(stat=sockstat(orphan=40_000))
    (finding,) = only(evaluate(window(warn), {}), "K07")
    assert finding.severity == "warning"
    assert finding.evidence["orphans"] == 40_000
    assert finding.evidence["tcp_max_orphans"] == 131072
    crit = snapshot(stat=sockstat(orphan=70_000))
    (finding,) = only(evaluate(window(crit), {}), "K07")
    assert finding.severity == "critical"
    assert "sysctl -w net.ipv4.tcp_max_orphans=262144" in finding.remediation


def test_k07_silent_below_a_quarter_and_in_namespaces_without_the_sysctl() -> None:
    assert only(evaluate(window(snapshot(stat=sockstat(orphan=30_000))), {}), "K07") == []
    child = snapshot(
        netns="tw-3",
        stat=sockstat(orphan=100_000),
        sysctl_overrides={"net.ipv4.tcp_max_orphans": None},
    )
    assert only(evaluate(window(child), {}), "K07") == []


# K08 -----------------------------------------------------------------------------------------


def test_k08_narrow_range() -> None:
    (finding,) = run("K08", {"net.ipv4.ip_local_port_range": (40000, 44999)})
    assert finding.severity == "warning"
    assert finding.evidence["ports"] == 5000
    assert "only 5000 ports (< 10000)" in str(finding.evidence["problems"])
    assert 'sysctl -w net.ipv4.ip_local_port_range="32768 60999"' in finding.remediation


def test_k08_equal_parity_alone_is_info() -> None:
    (finding,) = run("K08", {"net.ipv4.ip_local_port_range": (32768, 61000)})
    assert finding.severity == "info"
    assert finding.evidence["problems"] == "both ends have the same parity"
    assert 'ip_local_port_range="32768 60999"' in finding.remediation


def test_k08_overlap_with_privileged_ports() -> None:
    overrides = {
        "net.ipv4.ip_local_port_range": (1000, 60999),
        "net.ipv4.ip_unprivileged_port_start": (1024,),
    }
    (finding,) = run("K08", overrides)
    assert finding.severity == "warning"
    assert "starts below ip_unprivileged_port_start (1024)" in str(finding.evidence["problems"])


def test_k08_persisted_range_the_kernel_rejects_at_boot() -> None:
    persisted = (
        PersistedSysctl(
            "/etc/sysctl.d/60-ports.conf", 3, "net.ipv4.ip_local_port_range", "500 65000"
        ),
    )
    (finding,) = only(evaluate(window(snapshot(), persisted=persisted), {}), "K08")
    assert finding.severity == "warning"
    assert (
        finding.evidence["rejected_persisted_line"] == "/etc/sysctl.d/60-ports.conf:3 (500 65000)"
    )


def test_k08_silent_on_the_default_range() -> None:
    assert run("K08") == []
    assert run("K08", {"net.ipv4.ip_local_port_range": (10000, 65535)}) == []


# K09 -----------------------------------------------------------------------------------------


def test_k09_silent_until_an_idle_timeout_is_declared() -> None:
    assert run("K09") == []
    declared = {"K09": RuleSettings(thresholds={"idle_timeout": 350})}
    (finding,) = run("K09", settings=declared)
    assert finding.evidence["tcp_keepalive_time"] == 7200
    assert finding.evidence["idle_timeout"] == 350
    assert finding.evidence["suggested_keepalive_time"] == 280
    assert "sysctl -w net.ipv4.tcp_keepalive_time=280" in finding.remediation
    assert run("K09", {"net.ipv4.tcp_keepalive_time": (300,)}, declared) == []


# K10 -----------------------------------------------------------------------------------------


def test_k10_explains_fin_timeout_as_info() -> None:
    (finding,) = run("K10", {"net.ipv4.tcp_fin_timeout": (15,)})
    assert finding.severity == "info"
    assert "TIME_WAIT" in finding.title
    assert finding.evidence["time_wait_seconds"] == 60
    assert run("K10") == []


# K11 -----------------------------------------------------------------------------------------


def test_k11_memory_pressure_warning_and_critical() -> None:
    warn = snapshot(stat=sockstat(memory_pages=400_000))
    (finding,) = only(evaluate(window(warn), {}), "K11")
    assert finding.severity == "warning"
    assert finding.evidence["tcp_mem_pressure"] == 383866
    crit = snapshot(stat=sockstat(memory_pages=520_000))
    (finding,) = only(evaluate(window(crit), {}), "K11")
    assert finding.severity == "critical"
    assert 'sysctl -w net.ipv4.tcp_mem="575796 767732 1151592"' in finding.remediation


def test_k11_silent_below_pressure_or_without_tcp_mem() -> None:
    assert only(evaluate(window(snapshot(stat=sockstat(memory_pages=383_866))), {}), "K11") == []
    child = snapshot(
        stat=sockstat(memory_pages=900_000), sysctl_overrides={"net.ipv4.tcp_mem": None}
    )
    assert only(evaluate(window(child), {}), "K11") == []


def test_k08_reserves_listener_ports_that_the_proposed_range_would_cover() -> None:
    table = socket_table([listener(22), listener(50000), listener(42000)])
    current = snapshot(
        sockets=table, sysctl_overrides={"net.ipv4.ip_local_port_range": (40000, 44999)}
    )
    (finding,) = only(evaluate(window(current), {}), "K08")
    lines = finding.remediation.splitlines()
    reserve = lines.index("sysctl -w net.ipv4.ip_local_reserved_ports=42000,50000")
    widen = lines.index('sysctl -w net.ipv4.ip_local_port_range="32768 60999"')
    assert reserve < widen
