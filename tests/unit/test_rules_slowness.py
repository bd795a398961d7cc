"""W rules on built snapshots: who is slow, from the live scans' stalls per peer (and the
namespace's drop counters and the closed connections over the window)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tcpwatch.model import DestinationUse, ProcessRef, Snapshot
from tcpwatch.rules import Finding, RuleSettings, Window, evaluate
from tcpwatch.stalls import ClosedWaits, InboundScan, ListenerConnections, LiveConnection, Stalls
from tests.unit.snapshots import (
    DEFAULT_OWNERS,
    T0,
    counters_plus,
    lifecycle,
    peer_stats,
    snapshot,
    socket_table,
    window,
)

CURL = ProcessRef(4200, "curl")
UPLOADER = ProcessRef(4300, "uploader")
WMEM = {"net.ipv4.tcp_wmem": (4096, 16384, 4194304)}


def connection(
    local: str = "10.0.0.1:41822",
    remote: str = "10.0.0.9:5432",
    inode: int = 9001,
    *,
    receive_queue: int = 0,
    send_queue: int = 0,
    zero_window: bool = False,
    receive_buffer: int = 131072,
    send_buffer: int = 87040,
    peer_window: int | None = 0,
    busy: float = 10.0,
    rwnd: float = 0.0,
    sndbuf: float = 0.0,
    rtt: float = 0.02,
) -> LiveConnection:
    return LiveConnection(
        local=local,
        remote=remote,
        inode=inode,
        receive_queue=receive_queue,
        send_queue=send_queue,
        zero_window=zero_window,
        receive_memory=receive_buffer if receive_queue else 0,
        receive_buffer=receive_buffer,
        send_buffer=send_buffer,
        drops=0,
        peer_window=peer_window,
        busy_seconds=busy,
        rwnd_limited_seconds=rwnd,
        sndbuf_limited_seconds=sndbuf,
        rtt_seconds=rtt,
        min_rtt_seconds=rtt / 2,
        delivery_rate=1_000_000,
        retransmitted=0,
        rto_recoveries=0,
    )


def stalls(
    connections: int = 4,
    *,
    busy: float | None = 40.0,
    rwnd: float | None = 0.0,
    sndbuf: float | None = 0.0,
    zero_window: int = 0,
    receive_full: int = 0,
    receive_queue: int = 0,
    send_queue: int = 0,
    drops: int | None = 0,
    sent: int = 0,
    retransmitted: int = 0,
    spurious: int | None = None,
    rto: tuple[int, float] | None = None,
    worst: tuple[LiveConnection, ...] = (),
) -> Stalls:
    return Stalls(
        connections=connections,
        busy_seconds=busy,
        rwnd_limited_seconds=rwnd,
        sndbuf_limited_seconds=sndbuf,
        send_queue_bytes=send_queue,
        send_queue_max_bytes=send_queue,
        receive_queue_bytes=receive_queue,
        receive_queue_max_bytes=receive_queue,
        zero_window=zero_window,
        receive_full=receive_full,
        drops=drops,
        retransmits_in_flight=1 if retransmitted else 0,
        rto_recoveries=None if rto is None else rto[0],
        rto_seconds=None if rto is None else rto[1],
        rwnd_limited_connections=connections if rwnd else 0,
        sndbuf_limited_connections=connections if sndbuf else 0,
        segments_sent=sent,
        segments_retransmitted=retransmitted,
        segments_spurious=spurious,
        worst=worst,
    )


def scanned(
    *,
    inbound: Stalls | None = None,
    outbound: Stalls | None = None,
    complete: bool = True,
    owners: dict[int, ProcessRef] | None = None,
    sysctls: dict[str, tuple[int, ...]] | None = None,
    counters: dict[str, int] | None = None,
    taken_at: float | None = None,
) -> Snapshot:
    """A snapshot whose listener 0.0.0.0:80 (nginx) has ``inbound`` clients and whose
    destination 10.0.0.9:5432 has ``outbound`` connections."""
    uses = []
    if outbound is not None:
        uses.append(DestinationUse("ipv4", "10.0.0.1", "10.0.0.9", 5432, 10, 0, stalls=outbound))
    scan = None
    if inbound is not None:
        item = ListenerConnections("0.0.0.0:80", "ipv4", "0.0.0.0", 80, 5003, inbound)
        scan = InboundScan((item,), inbound.connections, 4096, complete, 0, T0)
    built = snapshot(
        sockets=socket_table(ephemeral_use=uses),
        owners=dict(DEFAULT_OWNERS) | {9001: CURL, 9002: UPLOADER} | dict(owners or {}),
        sysctl_overrides=sysctls,
        counters=counters_plus(
            {"TcpExtTCPRcvQDrop": 0, "TcpExtTCPZeroWindowDrop": 0} | dict(counters or {})
        ),
        **({"taken_at": taken_at} if taken_at is not None else {}),
    )
    return replace(built, inbound=scan)


def judged(
    current: Snapshot, rule_id: str, previous: Snapshot | None = None, **settings: float
) -> list[Finding]:
    chosen = {rule_id: RuleSettings(thresholds=settings)} if settings else {}
    return [f for f in evaluate(window(current, previous), chosen) if f.rule_id == rule_id]


# --- W01 -------------------------------------------------------------------------------------


SLOW_CLIENTS = stalls(
    busy=20.0,
    rwnd=19.8,
    zero_window=4,
    send_queue=16_000_000,
    worst=(
        connection("10.0.0.1:80", "203.0.113.7:50000", 1, send_queue=4_000_000, zero_window=True,
                   busy=5.0, rwnd=4.95),
        connection("10.0.0.1:80", "203.0.113.8:50001", 2, send_queue=4_000_000, busy=5.0,
                   rwnd=4.9, peer_window=8192),
    ),
)  # fmt: skip


def test_w01_names_the_listener_its_owner_and_the_worst_clients() -> None:
    (finding,) = judged(scanned(inbound=SLOW_CLIENTS, complete=False), "W01")
    assert finding.severity == "info"  # a listener's clients: their pace
    assert finding.subject == "0.0.0.0:80"
    assert "nginx[1234]" in finding.title and "99%" in finding.title
    assert "4 of 4 connections stalled now" in finding.title
    evidence = finding.evidence
    assert (evidence["listener"], evidence["process"], evidence["pid"]) == (
        "0.0.0.0:80",
        "nginx",
        1234,
    )
    assert evidence["rwnd_limited_share"] == pytest.approx(0.99)
    assert evidence["zero_window_connections"] == 4
    assert evidence["connections_scanned"] == 4  # the limit cut the scan: a sample
    assert evidence["worst_peers"].startswith("203.0.113.7:50000 (Send-Q 3.8 MiB, peer window 0")
    assert evidence["peer_window_max_bytes"] == 8192
    assert "sport = :80" in finding.remediation and "send_timeout" in finding.remediation


def test_w01_a_destination_that_reads_slowly_is_a_warning_naming_the_sender() -> None:
    slow = stalls(
        busy=10.0, rwnd=8.0, zero_window=1, worst=(connection(rwnd=8.0, zero_window=True),)
    )
    (finding,) = judged(scanned(outbound=slow), "W01")
    assert finding.severity == "warning"
    assert finding.title.startswith("10.0.0.9:5432 reads slower than curl[4200] sends: 80%")
    assert finding.evidence["worst_connections"].startswith("10.0.0.1:41822 -> 10.0.0.9:5432")
    assert "dst 10.0.0.9:5432" in finding.remediation


@pytest.mark.parametrize(
    ("state", "settings"),
    [
        (stalls(busy=20.0, rwnd=9.0), {}),  # 45 % of the time: below the warning
        (stalls(busy=0.5, rwnd=0.5, zero_window=4), {}),  # too little busy time to judge
        (stalls(busy=20.0, rwnd=19.0), {"warning": 0.99}),
        (stalls(busy=None, rwnd=None, zero_window=1), {}),  # no chronographs: 1 stalled now
    ],
)
def test_w01_stays_silent(state: Stalls, settings: dict[str, float]) -> None:
    assert judged(scanned(inbound=state), "W01", **settings) == []


def test_w01_before_4_10_reports_closed_windows_now() -> None:
    old = stalls(busy=None, rwnd=None, sndbuf=None, zero_window=3)
    (finding,) = judged(scanned(inbound=old), "W01")
    assert "now" in finding.title and "rwnd_limited_share" not in finding.evidence


def closed_window(
    live: Snapshot, row: str, direction: str, closes: int, waits: ClosedWaits
) -> tuple[Snapshot, Snapshot]:
    """(before, after): ``closes`` connections of ``row`` closed in the window, with ``waits``
    (10 closed earlier, 1 s busy, none waiting)."""
    early = ClosedWaits(1_000_000, 0, 0, 0)
    before = replace(
        replace(live, taken_at=T0),
        connections=lifecycle([peer_stats(row, direction, ok=10, waits=early)]),
    )
    after = replace(
        live,
        connections=lifecycle([peer_stats(row, direction, ok=10 + closes, waits=early + waits)]),
    )
    return before, after


def test_w01_short_downloads_are_judged_by_the_connections_that_closed() -> None:
    """Clients that read slowly but finish between two scans: no live connection to see, the
    closed ones' chronographs tell; the listener's owner is named from its socket."""
    before, after = closed_window(
        scanned(), "0.0.0.0:80", "inbound", 20, ClosedWaits(40_000_000, 36_000_000, 0, 5)
    )
    (finding,) = judged(after, "W01", before)
    assert finding.severity == "info" and finding.subject == "0.0.0.0:80"
    assert finding.title == (
        "nginx[1234] waits on its clients' windows at 0.0.0.0:80: 90% of the sending time of "
        "connections that closed, 5 of 20 closed on a zero window"
    )
    evidence = finding.evidence
    assert (evidence["connections"], evidence["closed_connections"]) == (0, 20)
    assert evidence["closed_rwnd_limited_share"] == 0.9
    assert (evidence["closed_busy_seconds"], evidence["zero_window_closes"]) == (40.0, 5)
    assert "rwnd_limited_share" not in evidence  # nothing live to share


@pytest.mark.parametrize(
    "waits",
    [
        ClosedWaits(40_000_000, 8_000_000, 0, 0),  # 20 %
        ClosedWaits(500_000, 500_000, 0, 3),  # too little busy time to judge
    ],
)
def test_w01_silent_for_closed_connections_that_did_not_wait(waits: ClosedWaits) -> None:
    before, after = closed_window(scanned(), "0.0.0.0:80", "inbound", 20, waits)
    assert judged(after, "W01", before) == []


# --- W02 -------------------------------------------------------------------------------------


NOT_READING = stalls(
    receive_full=4,
    receive_queue=3_000_000,
    drops=21,
    worst=(connection(receive_queue=1_500_000, receive_buffer=1_700_000),),
)


def test_w02_names_the_process_that_does_not_read() -> None:
    (finding,) = judged(scanned(outbound=NOT_READING), "W02")
    assert finding.severity == "warning"
    assert finding.title.startswith("curl[4200] does not read its connections to 10.0.0.9:5432")
    assert finding.evidence["receive_full_connections"] == 4
    assert finding.evidence["socket_drops"] == 21
    assert (
        finding.evidence["worst_connections"]
        == "10.0.0.1:41822 (Recv-Q 1.4 MiB of a 1.6 MiB buffer)"
    )
    assert "top -H -p 4200" in finding.remediation


def test_w02_is_critical_when_the_kernel_drops_for_full_buffers() -> None:
    before = scanned(inbound=NOT_READING, taken_at=T0)
    after = scanned(inbound=NOT_READING, counters={"TcpExtTCPRcvQDrop": 7})
    (finding,) = judged(after, "W02", before)
    assert finding.severity == "critical"
    assert finding.subject == "0.0.0.0:80" and finding.evidence["process"] == "nginx"
    assert finding.evidence["tcp_rcv_q_drop_in_window"] == 7


def test_w02_drops_without_a_full_buffer_at_the_scan_are_one_namespace_finding() -> None:
    before = scanned(taken_at=T0)
    after = scanned(counters={"TcpExtTCPZeroWindowDrop": 3})
    (finding,) = judged(after, "W02", before)
    assert (finding.severity, finding.subject) == ("critical", "")
    assert finding.evidence == {
        "tcp_rcv_q_drop_in_window": 0,
        "tcp_zero_window_drop_in_window": 3,
        "window_seconds": 5.0,
    }


def test_w02_silent_for_data_in_flight_to_a_reader() -> None:
    busy_reader = stalls(receive_queue=40_000, receive_full=0)
    assert judged(scanned(inbound=busy_reader, outbound=busy_reader), "W02") == []


# --- W03 -------------------------------------------------------------------------------------


def buffer_bound(send_buffer: int) -> Stalls:
    return stalls(
        busy=30.0,
        sndbuf=24.0,
        send_queue=4096,
        worst=(connection(inode=9002, send_buffer=send_buffer, sndbuf=24.0, rtt=0.02),),
    )


def test_w03_an_application_that_set_so_sndbuf() -> None:
    (finding,) = judged(scanned(outbound=buffer_bound(4608), sysctls=WMEM), "W03")
    assert (
        finding.title
        == "uploader[4300] waits on its send buffer towards 10.0.0.9:5432: 80% of its sending time"
    )
    evidence = finding.evidence
    assert (evidence["send_buffer_bytes"], evidence["tcp_wmem_max"]) == (4608, 4194304)
    assert evidence["rtt_seconds"] == 0.01  # the minimum RTT
    assert evidence["throughput_ceiling_bytes_per_second"] == 230400  # 4608 / 2 / 0.01
    assert "sets SO_SNDBUF itself" in finding.remediation
    assert "capped at net.core.wmem_max" in finding.remediation
    assert "sysctl -w" not in finding.remediation


def test_w03_autotuning_at_tcp_wmem_max_gets_the_sysctl_fix() -> None:
    (finding,) = judged(scanned(outbound=buffer_bound(4194304), sysctls=WMEM), "W03")
    assert 'sysctl -w net.ipv4.tcp_wmem="4096 16384 16777216"' in finding.remediation
    assert "/etc/sysctl.d/90-tcpwatch-tcp-wmem.conf" in finding.remediation


def test_w03_closed_connections_without_a_live_one_get_both_fixes() -> None:
    before, after = closed_window(
        scanned(sysctls=WMEM), "10.0.0.9:5432", "outbound", 3, ClosedWaits(9_000_000, 0, 6_000_000)
    )
    (finding,) = judged(after, "W03", before)
    assert finding.title.endswith(
        "10.0.0.9:5432: 67% of the sending time of connections that closed"
    )
    assert finding.evidence["closed_sndbuf_limited_share"] == pytest.approx(0.6667, abs=1e-4)
    assert "closed before a scan read their buffers" in finding.remediation
    assert 'sysctl -w net.ipv4.tcp_wmem="4096 16384 16777216"' in finding.remediation


def test_w03_silent_below_its_share() -> None:
    assert judged(scanned(outbound=stalls(busy=30.0, sndbuf=3.0)), "W03") == []


# --- W04 -------------------------------------------------------------------------------------


LOSSY = stalls(
    busy=30.0, rwnd=1.0, sndbuf=0.5, sent=10_000, retransmitted=400, spurious=0, rto=(12, 3.5)
)


def test_w04_loss_with_open_windows_and_buffers_is_the_network() -> None:
    (finding,) = judged(scanned(outbound=LOSSY), "W04")
    assert finding.title.startswith("10.0.0.9:5432: 4.0% of segments retransmitted")
    assert (finding.evidence["rto_recoveries"], finding.evidence["rto_seconds"]) == (12, 3.5)
    assert "mtr -rwzbc 100 --tcp -P 5432 10.0.0.9" in finding.remediation


def test_w04_does_not_count_the_retransmissions_the_peer_reported_as_duplicates() -> None:
    """tcpi_dsack_dups: the peer got the original too (D-SACK), so resending it repaired no
    loss (reordering, an early timeout or probe). 400 of 10,000 resent, 300 of them reported
    duplicate: 1 % lost, below W04's 2 %."""
    reordered = stalls(busy=30.0, sent=10_000, retransmitted=400, spurious=300)
    assert judged(scanned(outbound=reordered), "W04") == []
    # 700 resent, 300 of them spurious: 4 % judged; both counts in the evidence.
    lossy = stalls(busy=30.0, sent=10_000, retransmitted=700, spurious=300)
    (finding,) = judged(scanned(outbound=lossy), "W04")
    assert finding.title.startswith("10.0.0.9:5432: 4.0% of segments retransmitted")
    evidence = finding.evidence
    assert evidence["retransmission_ratio"] == 0.04
    assert (evidence["segments_retransmitted"], evidence["spurious_retransmissions"]) == (700, 300)
    # A kernel without the count (before 4.19): every retransmission counts, none is shown.
    (older,) = judged(scanned(outbound=replace(lossy, segments_spurious=None)), "W04")
    assert older.evidence["retransmission_ratio"] == 0.07
    assert "spurious_retransmissions" not in older.evidence


def test_w04_adds_the_connections_that_closed_in_the_window() -> None:
    quiet = stalls(busy=30.0, sent=100, retransmitted=0)
    before = replace(
        scanned(outbound=quiet, taken_at=T0),
        connections=lifecycle(
            [peer_stats("10.0.0.9:5432", ok=10, segments_sent=100, segments_retransmitted=0)]
        ),
    )
    after = replace(
        scanned(outbound=quiet),
        connections=lifecycle(
            [peer_stats("10.0.0.9:5432", ok=20, segments_sent=1100, segments_retransmitted=50)]
        ),
    )
    (finding,) = judged(after, "W04", before)  # fmt: skip
    assert (finding.evidence["segments_sent"], finding.evidence["segments_retransmitted"]) == (
        1100,
        50,
    )
    assert finding.evidence["connections_closed"] == 10


def test_w04_a_receiver_that_held_the_closed_connections_back_is_not_the_network() -> None:
    before, after = closed_window(
        scanned(outbound=LOSSY), "10.0.0.9:5432", "outbound", 5, ClosedWaits(90_000_000, 80_000_000)
    )
    assert judged(after, "W04", before) == []  # (1 + 80) s of (30 + 90) s busy: W01's
    assert judged(after, "W01", before)


@pytest.mark.parametrize(
    "state",
    [
        stalls(busy=30.0, rwnd=20.0, sent=10_000, retransmitted=400),  # the receiver: W01's
        stalls(busy=30.0, sndbuf=20.0, sent=10_000, retransmitted=400),  # the buffer: W03's
        stalls(sent=300, retransmitted=100),  # too few segments to judge
        stalls(sent=10_000, retransmitted=100),  # 1 %
    ],
)
def test_w04_stays_silent(state: Stalls) -> None:
    assert judged(scanned(outbound=state, inbound=state), "W04") == []


def evidence_scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """Windows that make every W rule emit every evidence key (tests/unit/test_rules_docs.py)."""
    closed_waits = ClosedWaits(10_000_000, 1_000_000, 1_000_000, 1)
    lossy_closed = lifecycle(
        [
            peer_stats(
                "10.0.0.9:5432", ok=10, segments_sent=1000, segments_retransmitted=90,
                waits=closed_waits,
            )
        ]
    )  # fmt: skip
    start = scanned(taken_at=T0)
    current = scanned(
        inbound=replace(SLOW_CLIENTS, drops=5, receive_full=1, receive_queue_bytes=10,
                        worst=(*SLOW_CLIENTS.worst, connection(receive_queue=10))),
        outbound=replace(LOSSY, receive_full=1, receive_queue_bytes=10,
                         worst=(connection(rwnd=1.0, zero_window=True),
                                *buffer_bound(4608).worst)),
        complete=False,
        sysctls=WMEM,
        counters={"TcpExtTCPRcvQDrop": 1},
    )  # fmt: skip
    settings = {
        "W01": RuleSettings(thresholds={"warning": 0.01}),
        "W03": RuleSettings(thresholds={"warning": 0.01}),
    }
    windowed = window(
        replace(current, connections=lossy_closed), replace(start, connections=lifecycle([]))
    )
    namespace_wide = window(scanned(counters={"TcpExtTCPRcvQDrop": 1}), start)
    # a listener's clients on a lossy path, sending a little from a small buffer too
    clients = window(scanned(inbound=LOSSY, complete=False, sysctls=WMEM))
    return [(windowed, settings), (namespace_wide, {}), (clients, settings)]


def test_the_evidence_scenarios_fire_every_w_rule() -> None:
    fired = {f.rule_id for win, settings in evidence_scenarios() for f in evaluate(win, settings)}
    assert {"W01", "W02", "W03", "W04"} <= fired


def test_the_owner_of_a_stalled_destination_is_wanted_a_healthy_one_is_not() -> None:
    """processes.wanted_inodes(): the worst connection of a destination that waits on something
    is attributed, so W01-W03 can name the process holding it."""
    from tcpwatch.sources.processes import STALLED_OWNERS, wanted_inodes

    stalled = replace(NOT_READING, worst=(connection(inode=777, receive_queue=10),))
    healthy = stalls(worst=(connection(inode=888),))
    uses = [
        DestinationUse("ipv4", "10.0.0.1", "10.0.0.9", 5432, 10, 0, stalls=stalled),
        DestinationUse("ipv4", "10.0.0.1", "10.0.0.8", 5432, 10, 0, stalls=healthy),
        *(
            DestinationUse("ipv4", "10.0.0.1", f"10.0.1.{n}", 80, 1, 0, stalls=stalled)
            for n in range(2 * STALLED_OWNERS)
        ),
    ]
    wanted = wanted_inodes(socket_table(ephemeral_use=uses))
    assert 777 in wanted and 888 not in wanted
