"""The whole exposition of a hand-built snapshot, against a checked-in golden file.

Regenerate after an intended change with:
    TCPWATCH_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_exposition_golden.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tcpwatch.model import (
    STATES,
    Attribution,
    DestinationUse,
    KernelCounters,
    LifecycleStats,
    Listener,
    OwnerProcess,
    OwnerProcesses,
    PeerStats,
    ProcessRef,
    Snapshot,
    SocketTable,
    SockStat,
    SourceStatus,
    Sysctls,
)
from tcpwatch.render.families.registry import registered_families
from tcpwatch.render.prometheus import build_info, render
from tcpwatch.rules import Finding
from tcpwatch.stalls import ClosedWaits, InboundScan, ListenerConnections, Stalls
from tcpwatch.state import ExportState, PollHistogram
from tcpwatch.tracepoint_stats import (
    ConnectStats,
    DropStats,
    ResetStats,
    TracepointHost,
    TracepointStats,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "metrics.prom"
# The sources tcpwatch_source_errors_total lists in the golden file: pinned here, the one test
# that needs them by name (the others read the registry), so adding a source does not rewrite
# the golden file's source rows.
GOLDEN_SOURCES = (
    "netns",
    "sysctl",
    "sockstat",
    "counters",
    "sockdiag",
    "lifecycle",
    "processes",
    "owners",
)


def peer(direction: str, name: str, closed: dict[str, int], rtt: tuple[int, ...]) -> PeerStats:
    count = sum(closed.values())
    return PeerStats(
        direction=direction,
        peer=name,
        closed={"ok": 0, "timeout": 0, "refused": 0, "aborted": 0} | closed,
        rtt_buckets=rtt,
        rtt_count=sum(rtt),
        rtt_sum_seconds=0.0005 * sum(rtt),
        segments_sent=12 * count,
        segments_retransmitted=count // 10,
        bytes_sent=1002 * count,
        bytes_received=5001 * count,
        # 59 ms busy a connection, 55 of them waiting on the window; one close in 700 at zero
        waits=ClosedWaits(59_000 * count, 55_000 * count, 1_000 * count, count // 700),
    )


def connections() -> LifecycleStats:
    """Closed connections: one listener, one destination with failures, the folded rest."""
    rows = (
        peer("inbound", "0.0.0.0:80", {"ok": 7000}, (0, 0, 0, 6000, 1000, *[0] * 7)),
        peer(
            "outbound",
            "10.0.0.9:5432",
            {"ok": 90, "timeout": 3, "refused": 4},
            (0, 0, 0, 0, 80, 10, 0, 0, 0, 0, 0, 0),
        ),
        peer("outbound", "10.0.0.7", {"aborted": 2}, (0,) * 12),
        peer("outbound", "other", {"ok": 10}, (0, 0, 0, 10, *[0] * 8)),
    )
    return LifecycleStats(
        peers=rows,
        events=7120,
        ignored=11,
        malformed=0,
        overruns=0,
        lost=0,
        max_peers=120,
        evicted=0,
        receive_buffer=8 << 20,
        folded={"outbound": 10},
    )


def stalls(connections: int, rwnd: float, zero_window: int, receive_queue: int) -> Stalls:
    return Stalls(
        connections=connections,
        busy_seconds=40.0,
        rwnd_limited_seconds=rwnd,
        sndbuf_limited_seconds=0.5,
        send_queue_bytes=4_000_000,
        send_queue_max_bytes=1_000_000,
        receive_queue_bytes=receive_queue,
        receive_queue_max_bytes=receive_queue,
        zero_window=zero_window,
        receive_full=1 if receive_queue else 0,
        drops=3,
        retransmits_in_flight=0,
        rto_recoveries=None,  # a kernel before 6.7: the series are left out
        rto_seconds=None,
    )


def inbound() -> InboundScan:
    """The listeners' scan: port 80's clients keep nginx waiting on their windows."""
    return InboundScan(
        listeners=(
            ListenerConnections("0.0.0.0:80", "ipv4", "0.0.0.0", 80, 1001, stalls(4, 39.0, 4, 0)),
        ),
        connections=4,
        limit=4096,
        complete=True,
        unmatched=0,
        scanned_at=1_699_999_970.0,
    )


def tracepoints() -> TracepointStats:
    """A client whose connects take one SYN retransmission now and then, a dead backend that
    haproxy reaches, resets to a port nothing listens on, drops at a full listener."""
    return TracepointStats(
        connects=(
            ConnectStats(
                "10.0.0.9:5432", "app", (0, 0, 0, 0, 80, 10, *[0] * 5, 2, 0, 0, 0), 92, 2.19,
                {"ETIMEDOUT": 1}, 4, 2,
            ),
            ConnectStats("127.0.0.1:9999", "haproxy", (0,) * 15, 0, 0.0, {"ECONNREFUSED": 3}, 0, 0),
        ),
        resets=(
            ResetStats("received", "127.0.0.1:9999", "", 3),
            ResetStats("sent", "127.0.0.1:9999", "NO_SOCKET", 3),
            ResetStats("sent", "0.0.0.0:80", "TCP_ABORT_ON_CLOSE", 1),
        ),
        drops=(DropStats("TCP_LISTEN_OVERFLOW", "0.0.0.0:80", 12),),
        host=TracepointHost(
            records={"set_state": 30000, "error_report": 9, "drop": 12},
            lost=0,
            unattributed={("set_state", "task_exited"): 2},
            other_netns=1400,
            cpus=2,
            buffer_bytes=512 << 10,
            events=("sock:inet_sock_set_state", "sock:inet_sk_error_report", "skb:kfree_skb"),
            sockets_followed=40,
            undelivered={"drop": 0, "error_report": 0, "retransmit": 1, "set_state": 0},
        ),
        folded={"connects": 3, "resets": 0, "drops": 0},
    )  # fmt: skip


def fixture_state() -> ExportState:
    counts = {
        "ipv4": {state: 0 for state in STATES} | {"established": 120, "listen": 3, "time_wait": 7},
        "ipv6": {state: 0 for state in STATES} | {"established": 2, "listen": 1, "close_wait": 60},
    }
    listeners = (
        Listener("ipv4", "0.0.0.0", 80, 129, 128, 4, 1001, 0, drops=10315),
        Listener("ipv4", "127.0.0.1", 8080, 0, 4096, 0, 1002, 0, drops=0),
        Listener("ipv4", "127.0.0.1", 8080, 2, 4096, 0, 1003, 1, drops=7),
        Listener("ipv6", "::", 443, 0, 511, 0, 1004, 0),
    )
    sockets = SocketTable(
        counts=counts,
        listeners=listeners,
        ephemeral_use=(
            DestinationUse(
                "ipv4",
                "10.0.0.1",
                "10.0.0.9",
                5432,
                900,
                850,
                established=50,
                rtt_connections=50,
                rtt_mean_seconds=0.0012,
                rtt_max_seconds=0.004,
                retransmits_in_flight=2,
                segments_retransmitted=31,
                segments_sent=40_000,
                stalls=stalls(50, 0.0, 0, 700_000),
            ),
            DestinationUse("ipv6", "::1", "::1", 6379, 3, 0),
        ),
        syn_sent=(),
        self_connects=(),
        inodes_by_state={"close_wait": frozenset(range(2000, 2060))},
        established_method="derived",
        messages=140,
        destinations_at=1_699_999_970.0,
    )
    owners = {
        1001: ProcessRef(10, "nginx"),
        1002: ProcessRef(11, "app"),
        1003: ProcessRef(12, "app"),
    }
    owners |= {inode: ProcessRef(11, "app") for inode in range(2000, 2060)}
    snapshot = Snapshot(
        netns="host",
        taken_at=1_700_000_000.0,
        sockets=sockets,
        counters=KernelCounters(
            {
                "TcpExtListenOverflows": 17,
                "TcpExtListenDrops": 19,
                "TcpExtSyncookiesSent": 0,
                "TcpActiveOpens": 5000,
                "TcpPassiveOpens": 7000,
                "TcpAttemptFails": 12,
                "TcpEstabResets": 3,
                "TcpOutRsts": 40,
                "TcpOutSegs": 900_000,
                "TcpRetransSegs": 450,
                "TcpExtTCPTimeouts": 20,
                "TcpExtTCPSynRetrans": 8,
                "TcpExtTCPAbortOnTimeout": 1,
                "TcpExtTCPAbortOnData": 2,
                "TcpExtTCPAbortOnClose": 0,
                "TcpExtTCPAbortOnMemory": 0,
                "TcpExtTCPAbortOnLinger": 0,
                "TcpExtTCPWinProbe": 18,
                "TcpExtTCPToZeroWindowAdv": 17,
                "TcpExtTCPFromZeroWindowAdv": 13,
                "TcpExtTCPWantZeroWindowAdv": 32,
                "TcpExtTCPZeroWindowDrop": 0,
                "TcpExtTCPRcvQDrop": 2,
                "TcpExtTCPBacklogDrop": 0,
                "TcpExtTCPOFODrop": 0,
                "TcpExtRcvPruned": 0,
                "TcpExtTCPLossProbes": 40,
                "TcpExtTCPSpuriousRTOs": 1,
            }
        ),
        sockstat=SockStat(125, 63, 1, 7, 130, 12),
        sysctls=Sysctls(
            {
                "net.core.somaxconn": (4096,),
                "net.ipv4.ip_local_port_range": (32768, 60999),
                "net.ipv4.tcp_mem": (190000, 253000, 380000),
            },
            ((32768, 32769),),
        ),
        attribution=Attribution(owners, processes_scanned=40, complete=True),
        sources=(
            SourceStatus("sysctl", True, 0.001),
            SourceStatus("sockstat", True, 0.0001),
            SourceStatus("counters", False, 0.0002, "permission denied"),
            SourceStatus("sockdiag", True, 0.01),
            SourceStatus("lifecycle", True, 0.0003),
            SourceStatus("processes", True, 0.02),
            SourceStatus("owners", True, 0.0004),
        ),
        # pid 12 (a listener's owner) exited before it was described; app has no fd limit.
        owner_processes=OwnerProcesses(
            {
                10: OwnerProcess(10, "nginx", "www-data", 1_699_990_000.0, 812, 1024, 524288, 1, 0),
                11: OwnerProcess(11, "app", "app", 1_699_000_000.5, 95, None, None, 1, 60),
            },
            wanted=3,
            failed=1,
        ),
        connections=connections(),
        inbound=inbound(),
        tracepoints=tracepoints(),
    )
    finding = Finding(
        rule_id="Q01",
        slug="accept-queue-full",
        severity="critical",
        title="Accept queue full",
        netns="host",
        subject="0.0.0.0:80",
        evidence={"queue_length": 129, "queue_max": 128},
        remediation="raise the backlog",
        doc="docs/rules/Q01-accept-queue-full.md",
    )
    return ExportState(
        snapshots=(snapshot,),
        findings=(finding,),
        last_poll=1_700_000_000.0,
        poll_durations=PollHistogram().observe(0.03).observe(0.2),
        source_errors={("host", "counters"): 2},
        top_processes=20,
        top_destinations=1,
        cached=True,
        source_names=GOLDEN_SOURCES,
    )


def test_exposition_matches_golden_file() -> None:
    text = render(fixture_state(), include_process=False).decode()
    if os.environ.get("TCPWATCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_golden_file_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (scripts/test does)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=GOLDEN.read_bytes(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_live_process_metrics_are_included_by_default() -> None:
    text = render(fixture_state()).decode()
    assert "process_cpu_seconds_total" in text
    assert 'tcpwatch_build_info{version="' in text


def test_every_declared_family_is_documented_with_an_example() -> None:
    """Iterates the families the modules of tcpwatch/render/families/ declare (and the
    collector's build info): a new family without its row in docs/metrics.md fails here."""
    docs = (Path(__file__).parent.parent.parent / "docs" / "metrics.md").read_text()
    state = fixture_state()
    exposed: set[str] = {build_info().name}
    for declared in registered_families():
        metrics = list(declared.render(state))
        assert metrics, f"{declared.name} renders no metric family"
        for metric in metrics:
            assert metric.name.startswith("tcpwatch_"), (declared.name, metric.name)
            exposed.add(metric.name + ("_total" if metric.type == "counter" else ""))
    assert len(exposed) > 30
    for name in sorted(exposed):
        assert f"`{name}`" in docs, f"{name} has no row in docs/metrics.md"
        assert f"\n{name}" in docs or f"\n{name}{{" in docs, f"{name}: no example line"
