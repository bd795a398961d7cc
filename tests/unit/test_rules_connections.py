"""C rules on built snapshots: connect failures, retransmissions and listener client quality,
judged over the window from the destroy listener's cumulative per-peer counts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tcpwatch.model import PEER_OTHER, Destination, LifecycleStats, PeerStats, ProcessRef
from tcpwatch.rules import Finding, RuleSettings, Window, evaluate
from tcpwatch.rules.peers import split_peer
from tests.unit.snapshots import (
    DEFAULT_LISTENERS,
    DEFAULT_OWNERS,
    NGINX,
    T0,
    lifecycle,
    listener,
    peer_stats,
    snapshot,
    socket_table,
    window,
)

CLIENT = ProcessRef(4100, "payments")
DB = "10.0.0.7:5432"


def only(findings: list[Finding], rule_id: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule_id]


def judged(
    before: list[PeerStats] | LifecycleStats | None,
    after: list[PeerStats] | LifecycleStats,
    rule_id: str,
    *,
    syn_sent: list[Destination] | None = None,
    syn_sent_owners: dict[int, ProcessRef] | None = None,
    settings: dict[str, RuleSettings] | None = None,
) -> list[Finding]:
    """``rule_id``'s findings over a 5 s window between two listener states."""
    owners = dict(DEFAULT_OWNERS) | dict(syn_sent_owners or {})
    table = socket_table(
        syn_sent=syn_sent or [],
        syn_sent_inodes=None if syn_sent_owners is None else tuple(syn_sent_owners),
    )

    def stats(value: list[PeerStats] | LifecycleStats) -> LifecycleStats:
        return value if isinstance(value, LifecycleStats) else lifecycle(value)

    current = snapshot(sockets=table, owners=owners, connections=stats(after))
    start = snapshot(
        taken_at=T0,
        sockets=table,
        owners=owners,
        connections=None if before is None else stats(before),
    )
    return only(evaluate(window(current, start), settings or {}), rule_id)


# C01 -----------------------------------------------------------------------------------------


def test_c01_timeouts_to_a_destination_are_a_warning_with_counts_rate_and_causes() -> None:
    [finding] = judged([peer_stats(DB, ok=100)], [peer_stats(DB, ok=117, timeout=3)], "C01")
    assert (finding.severity, finding.subject) == ("warning", DB)
    assert dict(finding.evidence) == {
        "destination": DB,
        "attempts": 20,
        "ok": 17,
        "timeout": 3,
        "refused": 0,
        "aborted": 0,
        "failure_ratio": 0.15,
        "failures_per_second": 0.6,
        "window_seconds": 5.0,
    }
    assert finding.title == f"3 of 20 connections to {DB} failed in 5 s: 3 timeout"
    assert "firewall or security group drops them" in finding.remediation
    assert "nothing listens on that port" not in finding.remediation  # no refusal seen
    assert f"ss -tnp state syn-sent 'dst {DB}'" in finding.remediation
    assert "tcpdump -ni any -c 50 'host 10.0.0.7 and tcp port 5432" in finding.remediation
    assert "nstat -az TcpAttemptFails" in finding.remediation


def test_c01_half_refused_is_critical_and_names_the_refusal_causes() -> None:
    [finding] = judged([], [peer_stats(DB, ok=5, refused=5)], "C01")  # absent before: from 0
    assert finding.severity == "critical"
    assert (finding.evidence["attempts"], finding.evidence["refused"]) == (10, 5)
    assert "nothing listens on that port" in finding.remediation
    assert "tcp_abort_on_overflow=1" in finding.remediation
    assert "on 10.0.0.7: ss -ltn 'sport = :5432'" in finding.remediation


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([peer_stats(DB, ok=100)], [peer_stats(DB, ok=105, timeout=4)]),  # 9 attempts < 10
        ([peer_stats(DB, ok=100)], [peer_stats(DB, ok=191, timeout=9)]),  # 9 % < 10 %
        (None, [peer_stats(DB, timeout=50)]),  # no source at the window's start
        # The listener restarted (its event count went backwards): no window.
        (lifecycle([peer_stats(DB, ok=500)], events=600), [peer_stats(DB, timeout=50)]),
        ([], [peer_stats("0.0.0.0:80", "inbound", refused=50)]),  # inbound: not a destination
        ([], [peer_stats(PEER_OTHER, timeout=50)]),  # many peers folded together
    ],
    ids=["few-attempts", "low-ratio", "no-source-before", "restart", "inbound", "other"],
)
def test_c01_silent(
    before: list[PeerStats] | LifecycleStats | None, after: list[PeerStats]
) -> None:
    assert judged(before, after, "C01") == []


def test_c01_silent_without_a_window() -> None:
    current = snapshot(connections=lifecycle([peer_stats(DB, timeout=50)]))
    assert only(evaluate(window(current), {}), "C01") == []


def test_c01_a_peer_whose_counts_went_back_was_evicted_and_counts_from_zero() -> None:
    # Another peer keeps the event total growing: only this row restarted.
    before = [peer_stats(DB, ok=500), peer_stats("10.0.0.8:80", ok=10)]
    after = [peer_stats(DB, ok=4, timeout=8), peer_stats("10.0.0.8:80", ok=600)]
    [finding] = judged(before, after, "C01")
    assert (finding.evidence["attempts"], finding.evidence["timeout"]) == (12, 8)


def test_c01_minimum_attempts_is_configurable() -> None:
    settings = {"C01": RuleSettings(thresholds={"minimum_attempts": 50})}
    assert judged([], [peer_stats(DB, ok=10, timeout=10)], "C01", settings=settings) == []


def test_c01_names_the_owner_when_every_syn_sent_socket_goes_there() -> None:
    owners = {8001: CLIENT, 8002: CLIENT}
    here = [Destination("ipv4", "10.0.0.7", 5432, 2)]
    [finding] = judged(
        [], [peer_stats(DB, ok=5, timeout=5)], "C01", syn_sent=here, syn_sent_owners=owners
    )
    assert finding.evidence["syn_sent_sockets"] == 2
    assert (finding.evidence["process"], finding.evidence["pid"]) == ("payments", 4100)
    assert f"connections to {DB} (payments[4100]) failed" in finding.title
    # Two owners: both named, no single pid.
    both = {8001: CLIENT, 8002: NGINX}
    [shared] = judged(
        [], [peer_stats(DB, ok=5, timeout=5)], "C01", syn_sent=here, syn_sent_owners=both
    )
    assert shared.evidence["process"] == "nginx[1234], payments[4100]"
    assert "pid" not in shared.evidence
    # SYN_SENT to another destination too: the inodes cannot be told apart, no owner.
    mixed = [*here, Destination("ipv4", "10.0.0.9", 443, 1)]
    [unsure] = judged(
        [],
        [peer_stats(DB, ok=5, timeout=5)],
        "C01",
        syn_sent=mixed,
        syn_sent_owners={**owners, 8003: NGINX},
    )
    assert unsure.evidence["syn_sent_sockets"] == 2 and "process" not in unsure.evidence


HAPROXY = ProcessRef(900, "haproxy")


def behind_haproxy(
    before: list[PeerStats], after: list[PeerStats], syn_sent: list[Destination] | None = None
) -> Window:
    """A namespace where haproxy listens on 127.0.0.1:8081, with the destroy listener's rows."""
    proxy = listener(8081, "127.0.0.1", inode=7100)
    table = socket_table([*DEFAULT_LISTENERS, proxy], syn_sent=syn_sent or [])
    owners = {**DEFAULT_OWNERS, 7100: HAPROXY}
    return window(
        snapshot(sockets=table, owners=owners, connections=lifecycle(after)),
        snapshot(taken_at=T0, sockets=table, owners=owners, connections=lifecycle(before)),
    )


def test_c01_failed_connects_whose_port_was_cleared_are_judged_on_their_own() -> None:
    """The issue's dead backend: haproxy's refused connects to 127.0.0.1:9999 arrive as
    127.0.0.1 without a port, beside 171,863 healthy connections to 127.0.0.1:8080."""
    win = behind_haproxy(
        [peer_stats("127.0.0.1:8080", ok=1000)],
        [peer_stats("127.0.0.1", aborted=23), peer_stats("127.0.0.1:8080", ok=172_863)],
    )
    [finding] = only(evaluate(win, {}), "C01")
    assert (finding.subject, finding.severity) == ("127.0.0.1", "critical")
    evidence = finding.evidence
    assert (evidence["attempts"], evidence["aborted"], evidence["failure_ratio"]) == (23, 23, 1.0)
    assert evidence["port"] == "unknown" and "SO_LINGER 0" in str(evidence["why_port_unknown"])
    assert evidence["other_ports"] == "127.0.0.1:8080 (171863 closed, 0 failed)"
    assert evidence["client"] == "haproxy[900]"
    assert evidence["failures_per_second"] == 4.6
    assert finding.title == (
        "23 of 23 connections to 127.0.0.1 failed in 5 s: 23 aborted, 4.6/s by haproxy[900]: "
        "port unknown, the kernel cleared it (the client closed them abortively)"
    )
    assert "the client is likely haproxy[900]" in finding.remediation
    assert "127.0.0.1 is an address of this host" in finding.remediation
    # Judged by their number: fewer failures than minimum_attempts stay silent, and many stay
    # a finding however many working connections the client cut the same way (haproxy with
    # http-server-close closes its healthy server connections abortively too).
    quiet = behind_haproxy([], [peer_stats("10.0.0.7", aborted=9, ok=91)])
    assert only(evaluate(quiet, {}), "C01") == []
    [diluted] = only(
        evaluate(behind_haproxy([], [peer_stats("10.0.0.7", aborted=40, ok=400)]), {}), "C01"
    )
    assert diluted.severity == "warning" and diluted.evidence["failure_ratio"] == 0.0909
    # Connects still waiting in SYN_SENT keep their port: the likely failing one is named.
    waiting = behind_haproxy(
        [], [peer_stats("10.77.0.2", aborted=200)], [Destination("ipv4", "10.77.0.2", 8080, 40)]
    )
    [blackholed] = only(evaluate(waiting, {}), "C01")
    assert blackholed.evidence["syn_sent_now"] == "10.77.0.2:8080 (40)"
    assert "the likely failing port" in blackholed.remediation
    # A remote address: no claim that it is this host's.
    [far] = only(evaluate(behind_haproxy([], [peer_stats("10.0.0.7", aborted=12)]), {}), "C01")
    assert "is an address of this host" not in far.remediation and far.severity == "critical"


def test_split_peer_reads_every_form_the_listener_writes() -> None:
    assert split_peer("10.0.0.5:5432") == ("10.0.0.5", 5432)
    assert split_peer("[2001:db8::5]:443") == ("2001:db8::5", 443)
    assert split_peer("10.0.0.5") == ("10.0.0.5", None)
    assert split_peer("2001:db8::5") == ("2001:db8::5", None)


# C02 -----------------------------------------------------------------------------------------


def test_c02_a_lossy_destination_is_flagged_with_its_ratio() -> None:
    before = [peer_stats(DB, ok=10, segments_sent=10_000, segments_retransmitted=10)]
    after = [peer_stats(DB, ok=30, segments_sent=11_000, segments_retransmitted=40)]
    [finding] = judged(before, after, "C02")
    assert (finding.severity, finding.subject) == ("warning", DB)
    assert dict(finding.evidence) == {
        "destination": DB,
        "segments_sent": 1000,
        "segments_retransmitted": 30,
        "retransmission_ratio": 0.03,
        "connections_closed": 20,
        "window_seconds": 5.0,
    }
    assert "mtr -rwzbc 100 --tcp -P 5432 10.0.0.7" in finding.remediation
    assert f"ss -tni 'dst {DB}'" in finding.remediation
    assert "ping -M do -s 1472" in finding.remediation
    critical = [peer_stats(DB, ok=30, segments_sent=11_000, segments_retransmitted=200)]
    [worse] = judged(before, critical, "C02")
    assert worse.severity == "critical"


def test_c02_counts_timeouts_as_evidence_and_leaves_all_failed_destinations_to_c01() -> None:
    mixed = [peer_stats(DB, ok=20, timeout=4, segments_sent=800, segments_retransmitted=40)]
    [finding] = judged([], mixed, "C02")
    assert finding.evidence["timeout"] == 4
    assert "see C01 too" in finding.remediation
    dead = [peer_stats(DB, timeout=100, segments_sent=700, segments_retransmitted=600)]
    assert judged([], dead, "C02") == []


def test_c02_silent_below_the_minimum_segments_and_the_warning() -> None:
    few = [peer_stats(DB, ok=3, segments_sent=499, segments_retransmitted=100)]
    assert judged([], few, "C02") == []
    clean = [peer_stats(DB, ok=3, segments_sent=10_000, segments_retransmitted=199)]
    assert judged([], clean, "C02") == []
    inbound = [
        peer_stats("0.0.0.0:80", "inbound", ok=3, segments_sent=1000, segments_retransmitted=500)
    ]
    assert judged([], inbound, "C02") == []


# C03 -----------------------------------------------------------------------------------------


def test_c03_slow_clients_of_a_listener_are_flagged_with_its_owner() -> None:
    before = [peer_stats("0.0.0.0:80", "inbound", ok=100, rtt_seconds=[0.001] * 100)]
    after = [peer_stats("0.0.0.0:80", "inbound", ok=130, rtt_seconds=[0.001] * 100 + [0.4] * 30)]
    [finding] = judged(before, after, "C03")
    assert (finding.severity, finding.subject) == ("warning", "0.0.0.0:80")
    assert finding.evidence["rtt_samples"] == 30
    assert finding.evidence["rtt_mean_seconds"] == pytest.approx(0.4)
    assert (finding.evidence["process"], finding.evidence["pid"]) == ("nginx", 1234)
    assert finding.title == "clients of 0.0.0.0:80 (nginx[1234]): mean RTT 400 ms"
    assert "ss -tni state established 'sport = :80'" in finding.remediation


def test_c03_retransmitting_clients_are_flagged_without_rtt_samples() -> None:
    after = [
        peer_stats("127.0.0.1:9000", "inbound", ok=5, segments_sent=1000, segments_retransmitted=80)
    ]
    [finding] = judged([], after, "C03")
    assert finding.evidence["retransmission_ratio"] == 0.08
    assert "rtt_mean_seconds" not in finding.evidence
    assert "process" not in finding.evidence  # no such listener in the snapshot
    assert (
        finding.title == "clients of 127.0.0.1:9000 (owner unknown): 8.0% of segments retransmitted"
    )


def test_c03_silent_for_few_samples_near_clients_and_outbound_peers() -> None:
    few = [peer_stats("0.0.0.0:80", "inbound", ok=19, rtt_seconds=[0.5] * 19)]
    assert judged([], few, "C03") == []
    near = [peer_stats("0.0.0.0:80", "inbound", ok=50, rtt_seconds=[0.2] * 50)]
    assert judged([], near, "C03") == []
    outbound = [peer_stats(DB, ok=50, rtt_seconds=[0.5] * 50)]
    assert judged([], outbound, "C03") == []
    settings = {"C03": RuleSettings(thresholds={"rtt_seconds": 0.1})}
    assert len(judged([], near, "C03", settings=settings)) == 1


def test_window_without_connections_on_either_side_is_silent_for_every_c_rule() -> None:
    win: Window = window(snapshot(), replace(snapshot(), taken_at=T0))
    assert [f for f in evaluate(win, {}) if f.rule_id.startswith("C")] == []


def test_c01_timeouts_to_a_full_local_listener_point_to_q01() -> None:
    full = listener(8080, "0.0.0.0", queue_length=5, queue_max=4, inode=7001)
    table = socket_table([*DEFAULT_LISTENERS, full])
    owners = {**DEFAULT_OWNERS, 7001: NGINX}
    current = snapshot(
        sockets=table,
        owners=owners,
        connections=lifecycle([peer_stats("127.0.0.1:8080", timeout=20)]),
    )
    start = snapshot(taken_at=T0, sockets=table, owners=owners, connections=lifecycle())
    [finding] = only(evaluate(window(current, start), {}), "C01")
    assert (finding.evidence["local_listener"], finding.evidence["full_queue"]) == (
        "0.0.0.0:8080",
        "accept",
    )
    first = finding.remediation.splitlines()[0]
    assert "the network is not at fault; see the Q01 finding for 0.0.0.0:8080" in first
    assert finding.evidence["cause"] == "listener dropping"
    # The same timeouts to a remote destination are the network's case.
    remote = lifecycle([peer_stats("10.0.0.9:8080", timeout=20)])
    [far] = only(evaluate(window(replace(current, connections=remote), start), {}), "C01")
    assert "local_listener" not in far.evidence


def test_c01_timeouts_to_a_local_listener_that_dropped_nothing_are_this_hosts_rules() -> None:
    calm = listener(8080, "127.0.0.1", queue_length=0, queue_max=128, inode=7001)
    table = socket_table([*DEFAULT_LISTENERS, replace(calm, drops=0)])
    owners = {**DEFAULT_OWNERS, 7001: NGINX}
    after = lifecycle(
        [peer_stats("127.0.0.1:8080", timeout=20), peer_stats("127.0.0.1:7", refused=20)]
    )
    current = snapshot(sockets=table, owners=owners, connections=after)
    start = snapshot(taken_at=T0, sockets=table, owners=owners, connections=lifecycle())
    found = {f.subject: f for f in only(evaluate(window(current, start), {}), "C01")}
    dropped = found["127.0.0.1:8080"]
    assert dropped.evidence["cause"] == "dropped before the listener"
    assert "nft list ruleset" in dropped.remediation
    assert "security group" not in dropped.remediation and "route" not in dropped.remediation
    nothing = found["127.0.0.1:7"]
    assert (nothing.evidence["cause"], nothing.evidence["local_listener"]) == (
        "nothing listens",
        "none",
    )
    assert "nothing listens on that port" in nothing.remediation


def test_c02_on_this_host_is_not_the_network() -> None:
    after = [peer_stats("127.0.0.1:5432", ok=77, segments_sent=690, segments_retransmitted=38)]
    [finding] = judged([], after, "C02")
    assert finding.severity == "info" and finding.evidence["destination_local"] == "yes"
    assert finding.title.endswith("on this host, not the network")
    assert "loss on the path" not in finding.remediation and "mtr" not in finding.remediation


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """C01's cleared-port and local cases, C02 on this host (for the rule pages' evidence)."""
    haproxy = behind_haproxy(
        [],
        [peer_stats("127.0.0.1", aborted=23), peer_stats("127.0.0.1:8080", ok=900)],
        syn_sent=[Destination("ipv4", "127.0.0.1", 9998, 3)],
    )
    dropping = replace(
        listener(8080, "127.0.0.1", queue_length=3, queue_max=32, inode=7001), drops=500
    )
    table = socket_table([*DEFAULT_LISTENERS, dropping])
    owners = {**DEFAULT_OWNERS, 7001: NGINX}
    start_table = socket_table([*DEFAULT_LISTENERS, replace(dropping, drops=100)])
    local = window(
        snapshot(
            sockets=table,
            owners=owners,
            connections=lifecycle(
                [
                    peer_stats("127.0.0.1:8080", timeout=20),
                    peer_stats(
                        "127.0.0.1:5432", ok=77, segments_sent=690, segments_retransmitted=38
                    ),
                ]
            ),
        ),
        snapshot(taken_at=T0, sockets=start_table, owners=owners, connections=lifecycle()),
    )
    return [(haproxy, {}), (local, {})]
