"""S rules on built snapshots: CLOSE_WAIT leaks, self-connects, SYN_SENT pile-ups."""

from __future__ import annotations

from tcpwatch.model import Destination, ProcessRef, SelfConnect
from tcpwatch.rules import Finding, RuleSettings, evaluate
from tests.unit.snapshots import T0, T1, snapshot, socket_table, window

LEAKY = ProcessRef(2200, "leaky-worker")
TIDY = ProcessRef(2300, "tidy")


def only(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule_id]


def held(leaky: int, tidy: int = 3, unowned: int = 0) -> tuple[list[int], dict[int, ProcessRef]]:
    """CLOSE_WAIT inodes: ``leaky`` held by LEAKY, ``tidy`` by TIDY, ``unowned`` by nobody found."""
    inodes = list(range(100_000, 100_000 + leaky + tidy + unowned))
    owners = {inode: LEAKY for inode in inodes[:leaky]}
    owners |= {inode: TIDY for inode in inodes[leaky : leaky + tidy]}
    return inodes, owners


# S01 -----------------------------------------------------------------------------------------


def test_s01_a_process_with_50_close_wait_sockets_is_flagged() -> None:
    inodes, owners = held(50)
    current = snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=owners)
    (finding,) = only(evaluate(window(current), {}), "S01")
    assert finding.severity == "warning"
    assert finding.subject == "leaky-worker[2200]"
    assert finding.evidence["process"] == "leaky-worker"
    assert finding.evidence["pid"] == 2200
    assert finding.evidence["close_wait_sockets"] == 50
    assert "stale_sockets" not in finding.evidence  # no daemon history in a one-shot check
    assert "grep 'pid=2200,'" in finding.remediation


def test_s01_silent_at_49_and_for_processes_below_the_threshold() -> None:
    inodes, owners = held(49)
    current = snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=owners)
    assert only(evaluate(window(current), {}), "S01") == []
    assert only(evaluate(window(snapshot()), {}), "S01") == []


def test_s01_critical_when_the_daemon_saw_the_same_sockets_stay_for_minutes() -> None:
    inodes, owners = held(60)
    first_seen = {inode: T1 - 400 for inode in inodes[:55]}
    first_seen |= {inode: T1 - 20 for inode in inodes[55:60]}
    current = snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=owners)
    (finding,) = only(evaluate(window(current, close_wait_first_seen=first_seen), {}), "S01")
    assert finding.severity == "critical"
    assert finding.evidence["stale_sockets"] == 55
    assert finding.evidence["oldest_seconds"] == 400.0
    assert finding.evidence["tracked_sockets"] == 60
    assert "for over 300 s" in finding.title
    young = {inode: T1 - 100 for inode in inodes}
    (finding,) = only(evaluate(window(current, close_wait_first_seen=young), {}), "S01")
    assert finding.severity == "warning"


def test_s01_reports_sockets_with_no_owner_found_and_what_stayed_through_the_window() -> None:
    inodes, owners = held(0, tidy=0, unowned=70)
    table = socket_table(close_wait_inodes=inodes)
    start = snapshot(taken_at=T0, sockets=socket_table(close_wait_inodes=inodes[:40]))
    current = snapshot(sockets=table, owners=owners, attribution_complete=False)
    (finding,) = only(evaluate(window(current, start), {}), "S01")
    assert finding.subject == "unknown process"
    assert finding.evidence["process"] == "unknown"
    assert str(finding.evidence["attribution"]).startswith("incomplete")
    assert finding.evidence["still_close_wait_since_window_start"] == 40


def test_s01_without_attribution_reports_the_namespace_total() -> None:
    inodes, _ = held(80, tidy=0)
    current = snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=None)
    (finding,) = only(evaluate(window(current), {}), "S01")
    assert finding.subject == ""
    assert finding.evidence["close_wait_sockets"] == 80
    assert finding.evidence["attribution"] == "unavailable"


def test_s01_threshold_is_configurable() -> None:
    inodes, owners = held(10)
    current = snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=owners)
    lowered = {"S01": RuleSettings(thresholds={"warning": 10})}
    assert [f.subject for f in only(evaluate(window(current), lowered), "S01")] == [
        "leaky-worker[2200]"
    ]


# S02 -----------------------------------------------------------------------------------------


def test_s02_self_connected_socket_is_critical() -> None:
    sock = SelfConnect("ipv4", "127.0.0.1", 45123, "established", 9001)
    current = snapshot(sockets=socket_table(self_connects=[sock]), owners={9001: LEAKY})
    (finding,) = only(evaluate(window(current), {}), "S02")
    assert finding.severity == "critical"
    assert finding.subject == "127.0.0.1:45123"
    assert finding.evidence["port"] == 45123
    assert finding.evidence["state"] == "established"
    assert finding.evidence["process"] == "leaky-worker"
    assert "ss -K -tn src 127.0.0.1:45123 dst 127.0.0.1:45123" in finding.remediation
    assert "sysctl -w net.ipv4.ip_local_reserved_ports=45123" in finding.remediation


def test_s02_silent_without_self_connects() -> None:
    assert only(evaluate(window(snapshot()), {}), "S02") == []


# S03 -----------------------------------------------------------------------------------------


def test_s03_syn_sent_pileup_to_one_destination() -> None:
    stuck = Destination("ipv4", "10.0.0.9", 5432, 25)
    start = snapshot(
        taken_at=T0, sockets=socket_table(syn_sent=[Destination("ipv4", "10.0.0.9", 5432, 18)])
    )
    current = snapshot(sockets=socket_table(syn_sent=[stuck, Destination("ipv6", "::1", 80, 2)]))
    (finding,) = only(evaluate(window(current, start), {}), "S03")
    assert finding.severity == "warning"
    assert finding.subject == "10.0.0.9:5432"
    assert finding.evidence["syn_sent_sockets"] == 25
    assert finding.evidence["syn_sent_at_window_start"] == 18
    assert "ss -tnp state syn-sent 'dst 10.0.0.9:5432'" in finding.remediation


def test_s03_silent_below_the_threshold() -> None:
    few = socket_table(syn_sent=[Destination("ipv4", "10.0.0.9", 5432, 19)])
    assert only(evaluate(window(snapshot(sockets=few)), {}), "S03") == []
