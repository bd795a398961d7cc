"""C04 (slow handshakes) and C05 (resets with their reason) over built snapshots: the
tracepoints source's cumulative counts at both ends of a window."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from tcpwatch.model import Listener, PeerStats
from tcpwatch.rules import Finding, RuleSettings, Window, evaluate
from tcpwatch.rules.tracepoints import quantile
from tcpwatch.tracepoint_stats import (
    CONNECT_BUCKETS_SECONDS,
    ConnectStats,
    DropStats,
    ResetStats,
    TracepointHost,
    TracepointStats,
)
from tests.unit.snapshots import (
    DEFAULT_LISTENERS,
    T0,
    T1,
    counters_plus,
    lifecycle,
    listener,
    peer_stats,
    snapshot,
    socket_table,
    window,
)

BOUNDS = CONNECT_BUCKETS_SECONDS
FAST = BOUNDS.index(0.001)  # (0.3 ms, 1 ms]
ONE_RETRANSMISSION = BOUNDS.index(3.0)  # (1 s, 3 s]
TWO_RETRANSMISSIONS = BOUNDS.index(10.0)  # (3 s, 10 s]


def connects(
    destination: str,
    process: str = "app",
    *,
    fast: int = 0,
    retransmitted: int = 0,
    twice: int = 0,
    failures: Mapping[str, int] | None = None,
) -> ConnectStats:
    buckets = [0] * (len(BOUNDS) + 1)
    buckets[FAST] += fast
    buckets[ONE_RETRANSMISSION] += retransmitted
    buckets[TWO_RETRANSMISSIONS] += twice
    return ConnectStats(
        destination=destination,
        process=process,
        buckets=tuple(buckets),
        count=fast + retransmitted + twice,
        sum_seconds=0.0008 * fast + 1.01 * retransmitted + 3.01 * twice,
        failures=dict(failures or {}),
        syn_retransmits=retransmitted + 2 * twice,
        retransmitted=retransmitted + twice,
    )


def stats(
    rows: Sequence[ConnectStats] = (),
    resets: Sequence[ResetStats] = (),
    records: int = 100,
    *,
    lost: int = 0,
    undelivered: Mapping[str, int] | None = None,
) -> TracepointStats:
    host = TracepointHost(
        {"set_state": records}, lost, {}, 0, 2, 524288, (), 0, dict(undelivered or {})
    )
    return TracepointStats(tuple(rows), tuple(resets), (), host)


def tracepoint_window(
    before: TracepointStats | None,
    after: TracepointStats | None,
    listeners: Sequence[object] = (),
) -> Window:
    table = socket_table([*DEFAULT_LISTENERS, *listeners])  # type: ignore[list-item]
    return window(
        replace(snapshot(sockets=table), tracepoints=after),
        replace(snapshot(taken_at=T0, sockets=table), tracepoints=before),
    )


def run(win: Window, rule_id: str, **thresholds: float) -> list[Finding]:
    settings = {rule_id: RuleSettings(thresholds=thresholds)} if thresholds else {}
    return [finding for finding in evaluate(win, settings) if finding.rule_id == rule_id]


# --- C04 -------------------------------------------------------------------------------------


def test_c04_fires_when_a_share_of_connects_takes_a_syn_retransmission() -> None:
    before = stats([connects("10.0.0.9:5432", fast=100)])
    after = stats(
        [
            connects("10.0.0.9:5432", fast=170, retransmitted=10),
            connects("10.0.0.9:5432", "worker", fast=5, retransmitted=5),
        ],
        records=200,
    )
    (finding,) = run(tracepoint_window(before, after), "C04")
    assert finding.severity == "warning" and finding.subject == "10.0.0.9:5432"
    evidence = finding.evidence
    assert (evidence["connects"], evidence["retransmitted"], evidence["syn_retransmits"]) == (
        90,
        15,
        15,
    )
    assert 1.0 < float(evidence["p90_seconds"]) <= 2.0
    assert evidence["processes"] == "app, worker"
    assert "SYN retransmission" in finding.remediation


def test_c04_is_critical_past_two_retransmissions_and_names_a_local_listener() -> None:
    after = stats([connects("127.0.0.1:8080", fast=10, twice=20)])
    win = tracepoint_window(stats(), after, [listener(8080, "127.0.0.1", inode=7100)])
    (finding,) = run(win, "C04")
    assert finding.severity == "critical"
    assert finding.evidence["local_listener"] == "127.0.0.1:8080"
    assert "Q01, Q02, Q04" in finding.remediation


def test_c04_stays_silent_when_fast_when_few_without_a_window_or_after_a_restart() -> None:
    fast = stats([connects("10.0.0.9:5432", fast=500, retransmitted=5)])
    assert run(tracepoint_window(stats(), fast), "C04") == []  # p90 well under 0.5 s
    few = stats([connects("10.0.0.9:5432", retransmitted=19)])
    assert run(tracepoint_window(stats(), few), "C04") == []  # under minimum_connects
    assert run(tracepoint_window(stats(), few), "C04", minimum_connects=10) != []
    slow = stats([connects("10.0.0.9:5432", retransmitted=50)])
    assert run(window(replace(snapshot(), tracepoints=slow)), "C04") == []  # no window
    restarted = stats([connects("10.0.0.9:5432", retransmitted=30)], records=10)
    assert run(tracepoint_window(slow, restarted), "C04") == []  # the reader began again


def test_c04_and_c05_say_how_many_records_the_kernel_did_not_deliver_in_the_window() -> None:
    rows = [connects("10.0.0.9:5432", retransmitted=30)]
    resets = [ResetStats("sent", "127.0.0.1:9999", "NO_SOCKET", 30)]
    before = stats(lost=5, undelivered={"retransmit": 2, "set_state": 1})
    missed = stats(rows, resets, 300, lost=7, undelivered={"retransmit": 4, "set_state": 1})
    for rule_id in ("C04", "C05"):
        (finding,) = run(tracepoint_window(before, missed), rule_id)
        assert finding.evidence["tracepoint_records_missed"] == 4  # 2 lost + 2 undelivered
        assert "did not deliver 4 tracepoint records" in finding.remediation
        # nothing missed in the window (the counts did not move): no key, no caveat
        (clean,) = run(tracepoint_window(before, replace(missed, host=before.host)), rule_id)
        assert "tracepoint_records_missed" not in clean.evidence
        assert "did not deliver" not in clean.remediation


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    buckets = [0] * (len(BOUNDS) + 1)
    buckets[BOUNDS.index(3.0)] = 10  # all ten in (1 s, 3 s]
    assert quantile(buckets, 0.5) == 2.0
    assert quantile(buckets, 0.9) == 2.8
    buckets[-1] = 100  # beyond the last bound: the last bound, as Prometheus answers
    assert quantile(buckets, 0.99) == BOUNDS[-1]


# --- C05 -------------------------------------------------------------------------------------


def test_c05_names_the_closed_port_and_the_local_clients_refused_there() -> None:
    before = stats(
        [connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 2})],
        [ResetStats("sent", "127.0.0.1:9999", "NO_SOCKET", 2)],
    )
    after = stats(
        [connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 7})],
        [
            ResetStats("received", "127.0.0.1:9999", "", 5),
            ResetStats("sent", "127.0.0.1:9999", "NO_SOCKET", 32),  # most to other clients
        ],
        records=300,
    )
    (finding,) = run(tracepoint_window(before, after), "C05")
    assert finding.subject == "127.0.0.1:9999 NO_SOCKET"
    assert dict(finding.evidence) == {
        "peer": "127.0.0.1:9999",
        "reason": "NO_SOCKET",
        "resets_sent": 30,
        "per_second": round(30 / (T1 - T0), 3),
        "resets_received": 5,
        "clients": "haproxy",
        "window_seconds": T1 - T0,
    }
    assert "ss -ltnp 'sport = :9999'" in finding.remediation


def test_c05_leaves_refusals_of_this_namespaces_own_clients_to_c01() -> None:
    after = stats(
        [connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 30})],
        [ResetStats("sent", "127.0.0.1:9999", "NO_SOCKET", 30)],
    )
    assert run(tracepoint_window(stats(), after), "C05") == []


def test_c05_says_when_something_listens_there_now() -> None:
    after = stats([], [ResetStats("sent", "127.0.0.1:8443", "NO_SOCKET", 12)])
    win = tracepoint_window(stats(), after, [listener(8443, "0.0.0.0", inode=7200)])
    (finding,) = run(win, "C05")
    assert finding.evidence["listening_now"] == "yes"
    assert "Something does now" in finding.remediation


def test_c05_explains_other_reasons_and_ignores_received_resets_alone() -> None:
    after = stats(
        [],
        [
            ResetStats("sent", "10.0.0.1:8080", "TCP_ABORT_ON_CLOSE", 500),  # the app's own
            ResetStats("sent", "10.0.0.1:8080", "TCP_STATE", 500),  # haproxy, nginx on purpose
            ResetStats("received", "10.0.0.9:5432", "", 500),
            ResetStats("sent", "10.0.0.9:5432", "TCP_KEEPALIVE_TIMEOUT", 15),
        ],
    )
    (finding,) = run(tracepoint_window(stats(), after), "C05")
    assert (finding.subject, finding.evidence["reason"]) == (
        "10.0.0.9:5432 TCP_KEEPALIVE_TIMEOUT",
        "TCP_KEEPALIVE_TIMEOUT",
    )
    assert "keepalive probes went unanswered" in finding.remediation
    assert run(tracepoint_window(stats(), after), "C05", minimum_resets=16) == []


def test_c05_stays_silent_without_a_window_or_the_source() -> None:
    after = stats([], [ResetStats("sent", "127.0.0.1:7", "NO_SOCKET", 50)])
    assert run(window(replace(snapshot(), tracepoints=after)), "C05") == []
    assert run(tracepoint_window(None, after), "C05") == []


def _c01_window(
    peers_before: list[PeerStats],
    peers_after: list[PeerStats],
    before: TracepointStats,
    after: TracepointStats,
    listeners: Sequence[Listener] = (),
) -> Window:
    table = socket_table([*DEFAULT_LISTENERS, *listeners])
    return window(
        replace(snapshot(sockets=table, connections=lifecycle(peers_after)), tracepoints=after),
        replace(
            snapshot(taken_at=T0, sockets=table, connections=lifecycle(peers_before)),
            tracepoints=before,
        ),
    )


def test_c01_names_the_port_errno_and_process_the_kernel_cleared_from_the_destroy_events() -> None:
    """haproxy's dead backend: its refused connects reach the destroy events as 127.0.0.1:*,
    the tracepoints kept 127.0.0.1:9999, ECONNREFUSED, haproxy."""
    win = _c01_window(
        [peer_stats("127.0.0.1", aborted=5)],
        [peer_stats("127.0.0.1", aborted=35)],
        stats([connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 5})]),
        stats([connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 35})], records=300),
    )
    (finding,) = run(win, "C01")
    evidence = finding.evidence
    assert (evidence["port"], evidence["connect_failures"]) == (
        "9999",
        "127.0.0.1:9999: 30 ECONNREFUSED by haproxy",
    )
    assert "why_port_unknown" not in evidence
    assert "to 127.0.0.1:9999 by haproxy, ECONNREFUSED" in finding.title
    assert "unknown" not in finding.title


def test_c01_joined_failures_are_judged_by_destination_and_the_unjoined_rest_go_with_them() -> None:
    """haproxy's dead backend once joined (peer_join.py): its refused connects count under
    127.0.0.1:9999; those the join missed (lost records) stayed under 127.0.0.1, where the
    tracepoints saw only that port fail: one finding, the bare count in its evidence. A bare
    address whose failures the tracepoints lay at no judged destination keeps its own."""
    healthy = peer_stats("127.0.0.1", ok=300)  # haproxy's healthy connections, cut abortively
    failed = connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 50})
    win = _c01_window(
        [peer_stats("127.0.0.1", ok=0)],
        [
            peer_stats("127.0.0.1:9999", refused=38),
            replace(healthy, closed={**healthy.closed, "aborted": 12}),
        ],
        stats(),
        stats([failed], records=300),
    )
    (finding,) = run(win, "C01")
    assert finding.subject == "127.0.0.1:9999" and finding.severity == "critical"
    assert finding.evidence["refused"] == 38 and finding.evidence["unjoined"] == 12
    assert finding.evidence["connect_failures"] == "127.0.0.1:9999: 50 ECONNREFUSED by haproxy"
    assert "12 more failed connects to 127.0.0.1" in finding.remediation
    # the tracepoints saw a second port of the address fail: the bare finding stays its own
    other = connects("127.0.0.1:7777", "haproxy", failures={"ECONNREFUSED": 12})
    win = _c01_window(
        [peer_stats("127.0.0.1", ok=0)],
        [
            peer_stats("127.0.0.1:9999", refused=38),
            replace(healthy, closed={**healthy.closed, "aborted": 12}),
        ],
        stats(),
        stats([failed, other], records=300),
    )
    assert {f.subject for f in run(win, "C01")} == {"127.0.0.1:9999", "127.0.0.1"}


def test_c01_without_the_tracepoints_still_says_the_port_is_unknown() -> None:
    win = _c01_window(
        [peer_stats("127.0.0.1", aborted=5)],
        [peer_stats("127.0.0.1", aborted=35)],
        stats(),
        stats(records=300),
    )
    (finding,) = run(win, "C01")
    assert finding.evidence["port"] == "unknown" and "connect_failures" not in finding.evidence


def test_c01_cites_a_local_firewall_rules_drops_for_unanswered_syns() -> None:
    before = stats()
    after = replace(stats(records=300), drops=(DropStats("NETFILTER_DROP", "", 40),))
    win = _c01_window(
        [peer_stats("10.0.0.9:5432", ok=10)],
        [peer_stats("10.0.0.9:5432", ok=10, timeout=30)],
        before,
        after,
    )
    (finding,) = run(win, "C01")
    assert finding.evidence["netfilter_drops_in_window"] == 40
    assert "NETFILTER_DROP" in finding.remediation


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """Windows that drive every evidence key of C04 and C05, and the keys the tracepoints add
    to C01 and Q02 (tests/unit/test_rules_docs.py)."""
    local = listener(8080, "127.0.0.1", inode=7100)
    slow = tracepoint_window(
        stats(),
        stats(
            [
                connects("127.0.0.1:8080", fast=5, twice=20, failures={"ETIMEDOUT": 2}),
                connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 5}),
            ],
            [
                ResetStats("received", "127.0.0.1:9999", "", 20),
                ResetStats("sent", "127.0.0.1:9999", "NO_SOCKET", 20),
                ResetStats("sent", "127.0.0.1:8443", "NO_SOCKET", 20),
            ],
            lost=3,
            undelivered={"retransmit": 1},
        ),
        [local, listener(8443, "0.0.0.0", inode=7200)],
    )
    cleared = _c01_window(
        [peer_stats("127.0.0.1", aborted=5)],
        [peer_stats("127.0.0.1", aborted=35)],
        stats(),
        stats([connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 30})], records=300),
    )
    firewalled = _c01_window(
        [peer_stats("10.0.0.9:5432", ok=10)],
        [peer_stats("10.0.0.9:5432", ok=10, timeout=30)],
        stats(),
        replace(stats(records=300), drops=(DropStats("NETFILTER_DROP", "", 40),)),
    )
    overflowing = replace(
        listener(8080, "127.0.0.1", queue_length=12, queue_max=32, inode=7300), drops=0
    )
    q02 = window(
        replace(
            snapshot(
                sockets=socket_table([replace(overflowing, drops=50)]),
                counters=counters_plus({"TcpExtListenOverflows": 50, "TcpExtListenDrops": 50}),
            ),
            tracepoints=replace(
                stats(records=300), drops=(DropStats("TCP_LISTEN_OVERFLOW", "127.0.0.1:8080", 50),)
            ),
        ),
        replace(snapshot(taken_at=T0, sockets=socket_table([overflowing])), tracepoints=stats()),
    )
    # without SYN cookies a local listener's full SYN queue counts too (C04 reads both sysctls)
    no_cookies = {"net.ipv4.tcp_syncookies": (0,)}
    uncookied = window(
        replace(slow.current, sysctls=snapshot(sysctl_overrides=no_cookies).sysctls),
        slow.previous,
    )
    joined = _c01_window(
        [peer_stats("127.0.0.1", ok=0)],
        [peer_stats("127.0.0.1:9999", refused=38), peer_stats("127.0.0.1", ok=50, aborted=12)],
        stats(),
        stats([connects("127.0.0.1:9999", "haproxy", failures={"ECONNREFUSED": 50})], records=300),
    )
    return [(slow, {}), (uncookied, {}), (cleared, {}), (joined, {}), (firewalled, {}), (q02, {})]


def test_c04_leaves_a_local_listener_that_drops_to_the_queue_rules() -> None:
    full = listener(8080, "127.0.0.1", queue_length=33, queue_max=32, inode=7100)
    after = stats([connects("127.0.0.1:8080", fast=10, twice=20)])
    assert run(tracepoint_window(stats(), after, [full]), "C04") == []
