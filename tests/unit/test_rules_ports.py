"""P rules on built snapshots: ephemeral port exhaustion and listeners inside the range."""

from __future__ import annotations

from dataclasses import replace

from tcpwatch.endpoints import ports_available
from tcpwatch.model import DestinationUse, ProcessRef, SelfConnect
from tcpwatch.rules import Finding, evaluate
from tests.unit.snapshots import DEFAULT_LISTENERS, listener, snapshot, socket_table, window

APP = ProcessRef(4321, "app-server")


def only(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule_id]


def use(sockets: int, time_wait: int = 0, port: int = 5432) -> DestinationUse:
    return DestinationUse("ipv4", "10.0.0.1", "10.0.0.5", port, sockets, time_wait)


def test_ports_available_subtracts_reserved_ports_inside_the_range() -> None:
    assert ports_available(32768, 60999, ()) == 28232
    assert ports_available(32768, 60999, ((8080, 8080), (40000, 40009), (60990, 61010))) == 28212


# P01 -----------------------------------------------------------------------------------------


def test_p01_warning_at_half_the_range() -> None:
    table = socket_table(ephemeral_use=[use(15000, time_wait=200), use(10)])
    (finding,) = only(evaluate(window(snapshot(sockets=table)), {}), "P01")
    assert finding.severity == "warning"
    assert finding.subject == "10.0.0.1 -> 10.0.0.5:5432"
    assert finding.evidence["sockets"] == 15000
    assert finding.evidence["ports_available"] == 28232
    assert finding.evidence["port_range"] == "32768-60999"
    assert finding.evidence["usage_ratio"] == round(15000 / 28232, 4)
    assert "tcp_tw_reuse" not in finding.remediation  # few TIME_WAIT: not the cause
    # Widening: the listener on 22/80 lie below 15000, nothing to reserve.
    assert 'sysctl -w net.ipv4.ip_local_port_range="15000 64999"' in finding.remediation
    assert "ip_local_reserved_ports" not in finding.remediation


def test_p01_critical_in_a_narrow_range_with_time_wait_and_listeners_to_reserve() -> None:
    table = socket_table(
        listeners=[*DEFAULT_LISTENERS, listener(20000), listener(40500)],
        ephemeral_use=[use(900, time_wait=800)],
    )
    current = snapshot(
        sockets=table,
        sysctl_overrides={"net.ipv4.ip_local_port_range": (40000, 40999)},
        reserved_ports=((40500, 40500),),
    )
    (finding,) = only(evaluate(window(current), {}), "P01")
    assert finding.severity == "critical"
    assert finding.evidence["ports_available"] == 999
    assert finding.evidence["time_wait"] == 800
    assert "sysctl -w net.ipv4.tcp_tw_reuse=1" in finding.remediation
    assert "sysctl -w net.ipv4.ip_local_reserved_ports=20000,40500" in finding.remediation
    assert 'ip_local_port_range="15000 64999"' in finding.remediation


def test_p01_silent_below_half_and_without_inputs() -> None:
    table = socket_table(ephemeral_use=[use(14000)])
    assert only(evaluate(window(snapshot(sockets=table)), {}), "P01") == []
    assert only(evaluate(window(snapshot(sockets=table, no_sysctls=True)), {}), "P01") == []
    assert only(evaluate(window(snapshot(sockets=None)), {}), "P01") == []


# P02 -----------------------------------------------------------------------------------------


def test_p02_listener_inside_the_range_with_one_reservation_command_for_all() -> None:
    table = socket_table(
        listeners=[*DEFAULT_LISTENERS, listener(45000, inode=7001), listener(50000, "::1")]
    )
    current = snapshot(sockets=table, owners={7001: APP}, reserved_ports=((9100, 9100),))
    findings = only(evaluate(window(current), {}), "P02")
    assert [f.subject for f in findings] == ["0.0.0.0:45000", "[::1]:50000"]
    first = findings[0]
    assert first.severity == "warning"
    assert first.evidence["port"] == 45000
    assert first.evidence["process"] == "app-server"
    assert first.evidence["pid"] == 4321
    command = "sysctl -w net.ipv4.ip_local_reserved_ports=9100,45000,50000"
    assert all(command in f.remediation for f in findings)


def test_p02_silent_for_service_ports_below_the_range_and_reserved_ports() -> None:
    assert only(evaluate(window(snapshot()), {}), "P02") == []
    table = socket_table(listeners=[*DEFAULT_LISTENERS, listener(45000)])
    reserved = snapshot(sockets=table, reserved_ports=((44000, 46000),))
    assert only(evaluate(window(reserved), {}), "P02") == []


def test_every_reservation_command_of_one_snapshot_is_the_same_superset() -> None:
    # Writing ip_local_reserved_ports replaces the list: if K08, P01, P02 and S02 each reserved
    # only "their" ports, applying one fix after another would undo the earlier ones.
    table = socket_table(
        listeners=[*DEFAULT_LISTENERS, listener(20000), listener(40500), listener(62000)],
        ephemeral_use=[use(900, time_wait=800)],
        self_connects=[SelfConnect("ipv4", "127.0.0.1", 40010, "established", 9)],
    )
    current = snapshot(
        sockets=table,
        sysctl_overrides={"net.ipv4.ip_local_port_range": (40000, 40999)},
        reserved_ports=((9100, 9100),),
    )
    findings = evaluate(window(current), {})
    commands = {
        line
        for f in findings
        for line in f.remediation.splitlines()
        if line.startswith("sysctl -w net.ipv4.ip_local_reserved_ports=")
    }
    assert {f.rule_id for f in findings} >= {"K08", "P01", "P02", "S02"}
    assert commands == {"sysctl -w net.ipv4.ip_local_reserved_ports=9100,20000,40010,40500,62000"}


def test_p01_never_proposes_a_range_below_ip_unprivileged_port_start() -> None:
    table = socket_table(ephemeral_use=[use(900)])
    current = snapshot(
        sockets=table,
        sysctl_overrides={
            "net.ipv4.ip_local_port_range": (40000, 40999),
            "net.ipv4.ip_unprivileged_port_start": (20001,),
        },
    )
    (finding,) = only(evaluate(window(current), {}), "P01")
    assert 'sysctl -w net.ipv4.ip_local_port_range="20001 64998"' in finding.remediation


def test_unknown_reservations_are_not_read_as_none() -> None:
    # ip_local_reserved_ports existed but could not be parsed (issue 16 item 5): no rule may say
    # a port is unreserved, and no fix may write a list that drops the unknown reservations.
    table = socket_table(
        listeners=[*DEFAULT_LISTENERS, listener(20000), listener(40500)],
        ephemeral_use=[use(900, time_wait=800)],
        self_connects=[SelfConnect("ipv4", "127.0.0.1", 40010, "established", 9)],
    )
    current = snapshot(
        sockets=table, sysctl_overrides={"net.ipv4.ip_local_port_range": (40000, 40999)}
    )
    assert current.sysctls is not None
    unknown = replace(current, sysctls=replace(current.sysctls, reserved_ports_known=False))
    known_findings = evaluate(window(current), {})
    findings = evaluate(window(unknown), {})
    assert only(known_findings, "P02") and not only(findings, "P02")
    assert {f.rule_id for f in findings} >= {"K08", "P01", "S02"}
    for finding in findings:
        assert "sysctl -w net.ipv4.ip_local_reserved_ports" not in finding.remediation
    manual = "# add 20000,40010,40500 to net.ipv4.ip_local_reserved_ports, keeping the ports"
    for rule_id in ("K08", "P01", "S02"):
        (finding,) = only(findings, rule_id)
        assert manual in finding.remediation, finding.remediation
    (p01,) = only(findings, "P01")
    assert p01.evidence["reserved_ports"] == "unknown (counted as none)"
    assert p01.evidence["ports_available"] == 1000
