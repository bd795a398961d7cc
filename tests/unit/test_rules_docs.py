"""Every evidence key a rule emits is documented on its page, and every documented key is emitted.

Integration tests and users assert on these keys (docs/check-json.md calls them stable), so the
pages and the code must not drift apart. The scenarios below drive every branch that adds a key;
a rule's own test module can add more with an ``evidence_scenarios()`` function (what a new rule
does, so this file keeps no list of rules).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import replace
from pathlib import Path

from tcpwatch.model import Destination, DestinationUse, PersistedSysctl, ProcessRef, SelfConnect
from tcpwatch.rules import RULES, Finding, RuleSettings, Window, evaluate
from tests.unit.snapshots import (
    DEFAULT_LISTENERS,
    NGINX,
    T0,
    counters_plus,
    lifecycle,
    listener,
    owner_process,
    peer_stats,
    snapshot,
    socket_table,
    sockstat,
    window,
)

REPO = Path(__file__).resolve().parents[2]
LEAKY = ProcessRef(55, "leaky")
ALL_COUNTERS = {
    "TcpExtListenOverflows": 20,
    "TcpExtListenDrops": 25,
    "TcpExtTCPReqQFullDrop": 3,
    "TcpExtTCPReqQFullDoCookies": 9,
    "TcpExtSyncookiesSent": 9,
    "TcpExtTCPTimeWaitOverflow": 4,
    "TcpExtTCPAbortOnMemory": 2,
    "TcpExtTCPMemoryPressures": 1,
}


def scenarios() -> list[tuple[Window, dict[str, RuleSettings]]]:
    listeners = [
        *DEFAULT_LISTENERS,
        listener(8080, queue_length=129, queue_max=128, syn_recv=120, inode=7001),
        listener(443, queue_length=0, queue_max=100, inode=7002),
        listener(443, queue_length=100, queue_max=100, inode=7003, socket_index=1),
        listener(33000, inode=7004),
        listener(9090, "127.0.0.1", queue_max=100, syn_recv=96, inode=7005),
    ]
    close_wait = list(range(1, 61)) + list(range(100, 160))
    table = socket_table(
        listeners,
        close_wait_inodes=close_wait,
        ephemeral_use=[DestinationUse("ipv4", "10.0.0.1", "10.0.0.5", 5432, 20000, 15000)],
        syn_sent=[
            Destination("ipv4", "10.0.0.9", 5432, 30),  # unreachable
            Destination("ipv4", "127.0.0.1", 8080, 25),  # local listener, accept queue full
            Destination("ipv4", "127.0.0.1", 9090, 25),  # local listener, SYN queue full
        ],
        self_connects=[SelfConnect("ipv4", "127.0.0.1", 45123, "established", 9001)],
    )
    owners = {7001: NGINX, 7002: NGINX, 7003: NGINX, 7004: LEAKY, 9001: LEAKY}
    owners |= {inode: LEAKY for inode in range(1, 61)}
    broken = {
        "net.ipv4.tcp_syncookies": (0,),
        "net.ipv4.tcp_max_syn_backlog": (128,),
        "net.core.somaxconn": (100,),
        "net.ipv4.tcp_abort_on_overflow": (1,),
        "net.ipv4.tcp_max_tw_buckets": (5000,),
        "net.ipv4.ip_local_port_range": (32768, 32768 + 4000),
        "net.ipv4.ip_unprivileged_port_start": (40000,),
        "net.ipv4.tcp_fin_timeout": (30,),
    }
    stat = sockstat(orphan=70_000, time_wait=4900, memory_pages=560_000)
    start = snapshot(taken_at=T0, sockets=table, owners=owners, sysctl_overrides=broken, stat=stat)
    end = snapshot(
        sockets=table,
        owners=owners,
        sysctl_overrides=broken,
        stat=stat,
        counters=counters_plus(ALL_COUNTERS),
        attribution_complete=False,
        described=[owner_process(NGINX.pid, NGINX.name, open_fds=1000, max_fds=1024)],
    )
    persisted = (
        PersistedSysctl("/etc/sysctl.conf", 3, "net.ipv4.ip_local_port_range", "500 65000"),
        PersistedSysctl("/etc/sysctl.conf", 4, "net.ipv4.tcp_tw_recycle", "1"),
    )
    first_seen = {inode: T0 - 600 for inode in range(1, 61)}
    settings = {"K09": RuleSettings(thresholds={"idle_timeout": 350})}
    everything = Window(end, start, first_seen, persisted)
    forced = {"net.ipv4.tcp_syncookies": (2,), "net.ipv4.tcp_tw_recycle": (1,)}
    cookies = window(
        snapshot(sysctl_overrides=forced, counters=counters_plus({"TcpExtSyncookiesSent": 5})),
        snapshot(taken_at=T0, sysctl_overrides=forced),
    )
    unattributed = window(snapshot(sockets=socket_table(close_wait_inodes=close_wait), owners=None))
    return [(everything, settings), (cookies, {}), (unattributed, {}), (connections(), {})]


def connections() -> Window:
    """C01 (a failing destination, its cleared-port aborts), C02 and C03 over one window."""
    before = lifecycle(
        [
            peer_stats("10.0.0.7:5432", ok=100, segments_sent=1000, segments_retransmitted=5),
            peer_stats("0.0.0.0:80", "inbound", ok=10),
        ]
    )
    after = lifecycle(
        [
            peer_stats(
                "10.0.0.7:5432",
                ok=110,
                timeout=6,
                refused=2,
                segments_sent=3000,
                segments_retransmitted=400,
            ),
            peer_stats("10.0.0.7", aborted=4),
            peer_stats(
                "0.0.0.0:80",
                "inbound",
                ok=60,
                rtt_seconds=[0.3] * 50,
                segments_sent=2000,
                segments_retransmitted=200,
            ),
        ]
    )
    # Connects to listeners of this namespace: one with a full accept queue, one with room
    # (whose SYN queue is then checked: tcp_syncookies 0).
    after = replace(
        after,
        peers=(
            *after.peers,
            peer_stats("127.0.0.1:8080", timeout=20),
            peer_stats("127.0.0.1:22", timeout=20),
        ),
    )
    listeners = [*DEFAULT_LISTENERS, listener(8080, "127.0.0.1", queue_length=9, queue_max=8)]
    table = socket_table(
        listeners,
        syn_sent=[Destination("ipv4", "10.0.0.7", 5432, 3)],
        syn_sent_inodes=(8001, 8002, 8003),
    )
    owners = {5003: NGINX, 8001: LEAKY, 8002: LEAKY, 8003: LEAKY}
    cookies_off = {"net.ipv4.tcp_syncookies": (0,)}
    return window(
        snapshot(sockets=table, owners=owners, connections=after, sysctl_overrides=cookies_off),
        snapshot(
            taken_at=T0,
            sockets=table,
            owners=owners,
            connections=before,
            sysctl_overrides=cookies_off,
        ),
    )


def scenarios_of_rule_tests() -> list[tuple[Window, dict[str, RuleSettings]]]:
    """What the rules' test modules (tests/unit/test_rules_*.py) add with
    ``evidence_scenarios()``: (window, settings) pairs, like :func:`scenarios`."""
    found: list[tuple[Window, dict[str, RuleSettings]]] = []
    for path in sorted(Path(__file__).parent.glob("test_rules_*.py")):
        module = importlib.import_module(f"{__package__}.{path.stem}")
        more = getattr(module, "evidence_scenarios", None)
        if more is not None:
            found += more()
    return found


def emitted() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {rule.id: set() for rule in RULES}
    findings: list[Finding] = []
    for win, settings in [*scenarios(), *scenarios_of_rule_tests()]:
        findings += evaluate(win, settings)
    for finding in findings:
        assert "could not run" not in finding.title, finding.title
        keys[finding.rule_id] |= set(finding.evidence)
    return keys


def documented(page: str) -> set[str]:
    section = page.split("## Evidence", 1)[1]
    keys: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            keys |= set(re.findall(r"`([A-Za-z0-9_]+)`", first_cell))
    return keys


def test_every_rule_fires_in_the_scenarios() -> None:
    silent = [rule_id for rule_id, keys in emitted().items() if not keys]
    assert silent == []


def test_evidence_keys_match_each_rules_page_exactly() -> None:
    keys = emitted()
    for rule in RULES:
        page = (REPO / rule.doc).read_text()
        assert keys[rule.id] == documented(page), rule.id


def test_every_evidence_key_is_snake_case() -> None:
    """One key style across rules (schema 2 of the JSON report): counters too, via counter_key."""
    snake = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
    odd = sorted(
        f"{rule_id}:{key}"
        for rule_id, keys in emitted().items()
        for key in keys
        if not snake.fullmatch(key)
    )
    assert odd == []
