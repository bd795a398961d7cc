"""S rules on built snapshots: CLOSE_WAIT leaks, self-connects, SYN_SENT pile-ups."""

from __future__ import annotations

from dataclasses import replace

from tcpwatch.model import Destination, DestinationUse, Listener, ProcessRef, SelfConnect, Snapshot
from tcpwatch.rules import Finding, RuleSettings, Window, evaluate
from tests.unit.snapshots import (
    DEFAULT_LISTENERS,
    DEFAULT_OWNERS,
    NGINX,
    T0,
    T1,
    listener,
    snapshot,
    socket_table,
    window,
)

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
    assert finding.subject == "leaky-worker"
    assert finding.title.startswith("leaky-worker[2200] holds 50 CLOSE_WAIT sockets")
    assert finding.evidence["process"] == "leaky-worker"
    assert finding.evidence["pid"] == 2200
    assert finding.evidence["close_wait_sockets"] == 50
    assert "stale_sockets" not in finding.evidence  # no daemon history in a one-shot check
    assert "grep 'pid=2200,'" in finding.remediation


def test_s01_the_subject_outlives_a_restart_of_the_process_the_pid_stays_in_the_evidence() -> None:
    inodes, owners = held(50)
    restarted = {i: ProcessRef(9100, o.name) if o == LEAKY else o for i, o in owners.items()}
    table = socket_table(close_wait_inodes=inodes)
    found = [
        only(evaluate(window(snapshot(sockets=table, owners=holders)), {}), "S01")[0]
        for holders in (owners, restarted)
    ]
    assert [f.subject for f in found] == ["leaky-worker", "leaky-worker"]
    assert [f.evidence["pid"] for f in found] == [2200, 9100]
    assert [f.evidence["close_wait_sockets"] for f in found] == [50, 50]
    assert "grep 'pid=9100,'" in found[1].remediation


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
    start = snapshot(taken_at=T0, sockets=socket_table(close_wait_inodes=inodes[:60]))
    current = snapshot(sockets=table, owners=owners, attribution_complete=False)
    (finding,) = only(evaluate(window(current, start), {}), "S01")
    assert finding.subject == "unknown process"
    assert finding.evidence["process"] == "unknown"
    assert str(finding.evidence["attribution"]).startswith("incomplete")
    assert finding.evidence["still_close_wait_since_window_start"] == 60
    assert finding.evidence["close_wait_sockets"] == 70


def test_s01_with_a_window_only_lasting_close_wait_is_a_leak() -> None:
    """A load tool's CLOSE_WAIT that it closes a moment later (wrk against an nginx closing
    keep-alive connections) is churn: none of those 200 was there when the window started."""
    inodes, owners = held(200)
    churned = window(
        snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=owners),
        snapshot(taken_at=T0, sockets=socket_table(close_wait_inodes=[1, 2, 3]), owners=owners),
    )
    assert only(evaluate(churned, {}), "S01") == []


def test_s01_one_program_whose_processes_each_hold_a_few() -> None:
    """PostgreSQL's backends, one per session, each left with the CLOSE_WAIT of a client that
    gave up during a long query: judged as the program."""
    inodes = list(range(200_000, 200_060))
    owners = {inode: ProcessRef(6000 + n, "postgres") for n, inode in enumerate(inodes)}
    table = socket_table(close_wait_inodes=inodes)
    win = window(
        snapshot(sockets=table, owners=owners), snapshot(taken_at=T0, sockets=table, owners=owners)
    )
    (finding,) = only(evaluate(win, {}), "S01")
    assert finding.subject == "postgres"
    evidence = finding.evidence
    assert (evidence["process"], evidence["processes"], evidence["close_wait_sockets"]) == (
        "postgres",
        60,
        60,
    )
    assert evidence["pids"] == "6000, 6001, 6002, 6003, 6004, ..."
    assert finding.title.startswith("postgres (60 processes) hold 60 CLOSE_WAIT sockets")
    assert "client_connection_check_interval" in finding.remediation
    # Two programs' few sockets each are not added together.
    mixed = {inode: ProcessRef(6000 + n, f"worker{n % 30}") for n, inode in enumerate(inodes)}
    assert only(evaluate(window(snapshot(sockets=table, owners=mixed)), {}), "S01") == []


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
    assert [f.subject for f in only(evaluate(window(current), lowered), "S01")] == ["leaky-worker"]


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


def s03_towards(
    destination: Destination,
    listeners: list[Listener],
    syncookies: int = 1,
    ephemeral: tuple[DestinationUse, ...] = (),
) -> list[Finding]:
    table = socket_table(
        [*DEFAULT_LISTENERS, *listeners], syn_sent=[destination], ephemeral_use=ephemeral
    )
    owners = {**DEFAULT_OWNERS, **{lsn.inode: NGINX for lsn in listeners}}
    current = snapshot(
        sockets=table,
        owners=owners,
        sysctl_overrides={"net.ipv4.tcp_syncookies": (syncookies,)},
    )
    return only(evaluate(window(current), {}), "S03")


def test_s03_a_full_local_listener_is_q01s_case_not_the_networks() -> None:
    full = listener(8080, "127.0.0.1", queue_length=129, queue_max=128, inode=7001)
    (finding,) = s03_towards(Destination("ipv4", "127.0.0.1", 8080, 30), [full])
    assert finding.subject == "127.0.0.1:8080"
    assert finding.title.endswith("its listener here (nginx[1234]) drops them (Q01)")
    assert finding.evidence["local_listener"] == "127.0.0.1:8080"
    assert finding.evidence["full_queue"] == "accept"
    assert (finding.evidence["listener_queue_length"], finding.evidence["listener_queue_max"]) == (
        129,
        128,
    )
    assert (finding.evidence["process"], finding.evidence["pid"]) == ("nginx", 1234)
    assert "Q01 accept-queue-full finding for 127.0.0.1:8080" in finding.remediation
    assert "ss -ltnm 'sport = :8080'" in finding.remediation
    assert "worker_connections" in finding.remediation
    assert "the host is down" not in finding.remediation


def test_s03_a_wildcard_listener_matches_a_local_address_only() -> None:
    full = listener(8080, "0.0.0.0", queue_length=128, queue_max=128, inode=7001)
    [loopback] = s03_towards(Destination("ipv4", "127.0.0.2", 8080, 30), [full])
    assert loopback.evidence["local_listener"] == "0.0.0.0:8080"
    # 10.1.1.1 is this host's address: outbound connections leave from it.
    use = DestinationUse("ipv4", "10.1.1.1", "10.0.0.5", 443, 3, 0)
    [own] = s03_towards(Destination("ipv4", "10.1.1.1", 8080, 30), [full], ephemeral=(use,))
    assert own.evidence["local_listener"] == "0.0.0.0:8080"
    # A remote address on the same port is the network's case: today's text.
    [remote] = s03_towards(Destination("ipv4", "10.0.0.9", 8080, 30), [full])
    assert "local_listener" not in remote.evidence
    assert remote.title == "30 connections to 10.0.0.9:8080 stuck in SYN_SENT"
    assert "the host is down, a firewall drops them" in remote.remediation
    # IPv6 loopback reaches the [::] listener.
    six = listener(8443, "::", queue_length=10, queue_max=10, inode=7002)
    [v6] = s03_towards(Destination("ipv6", "::1", 8443, 30), [six])
    assert v6.evidence["local_listener"] == "[::]:8443"


def test_s03_a_full_syn_queue_without_cookies_is_named_too() -> None:
    half_open = listener(9090, "127.0.0.1", queue_max=100, syn_recv=100, inode=7001)
    destination = Destination("ipv4", "127.0.0.1", 9090, 25)
    [finding] = s03_towards(destination, [half_open], syncookies=0)
    assert finding.evidence["full_queue"] == "SYN" and finding.evidence["listener_syn_recv"] == 100
    assert "(Q04)" in finding.title and "Q04 syn-queue-pressure" in finding.remediation
    # With SYN cookies a full SYN queue still answers: the SYNs vanish before the listener.
    [cookies] = s03_towards(destination, [half_open], syncookies=1)
    assert cookies.evidence["cause"] == "dropped before the listener"


def test_s03_a_local_listener_that_dropped_nothing_means_this_host_drops_the_syns() -> None:
    calm = listener(8080, "127.0.0.1", queue_length=3, queue_max=128, inode=7001)
    [finding] = s03_towards(Destination("ipv4", "127.0.0.1", 8080, 30), [calm])
    assert finding.title == (
        "30 connections to 127.0.0.1:8080 stuck in SYN_SENT: dropped on this host before its "
        "listener (nginx[1234])"
    )
    assert finding.evidence["cause"] == "dropped before the listener"
    assert finding.evidence["full_queue"] == "none"
    assert "nft list ruleset" in finding.remediation and "iptables-save" in finding.remediation
    assert "the host is down" not in finding.remediation
    assert "route" not in finding.remediation


def test_s03_a_local_address_where_nothing_listens() -> None:
    [finding] = s03_towards(Destination("ipv4", "127.0.0.1", 7777, 30), [])
    assert finding.evidence["local_listener"] == "none"
    assert finding.title.endswith("stuck in SYN_SENT: dropped on this host")
    assert (
        "nothing listens there" in finding.remediation and "nft list ruleset" in finding.remediation
    )


def overflowing_nginx(drops: int, taken_at: float) -> Snapshot:
    """nginx on 127.0.0.1:8080 with room in its queue at the poll, wrk's SYNs waiting."""
    lsn = replace(listener(8080, "127.0.0.1", 12, 32, inode=7001), drops=drops)
    table = socket_table([lsn], syn_sent=[Destination("ipv4", "127.0.0.1", 8080, 237)])
    return snapshot(taken_at=taken_at, sockets=table, owners={7001: NGINX})


def overflow_window() -> Window:
    return window(overflowing_nginx(10315, T0 + 5), overflowing_nginx(7962, T0))


def test_s03_a_local_listener_that_overflows_between_polls() -> None:
    """Its queue has room at the poll, but it dropped SYNs during the window: its case (Q02)."""
    (finding,) = only(evaluate(overflow_window(), {}), "S03")
    evidence = finding.evidence
    assert (evidence["cause"], evidence["listener_drops_in_window"]) == ("listener dropping", 2353)
    assert evidence["full_queue"] == "none" and evidence["local_listener"] == "127.0.0.1:8080"
    assert finding.title.endswith("its listener here (nginx[1234]) drops them (Q02)")
    assert "it dropped 2353 connection attempts in the window" in finding.remediation
    assert "host is down" not in finding.remediation and "firewall" not in finding.remediation


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """A local listener that dropped during the window (for the S03 page's evidence table)."""
    return [(overflow_window(), {}), (close_wait_window(), {})]


def close_wait_window() -> Window:
    inodes = list(range(200_000, 200_060))
    owners = {inode: ProcessRef(6000 + n, "postgres") for n, inode in enumerate(inodes)}
    table = socket_table(close_wait_inodes=inodes)
    return window(
        snapshot(sockets=table, owners=owners), snapshot(taken_at=T0, sockets=table, owners=owners)
    )
