"""A worst-case node, and one scrape of it counted against the series arithmetic of
docs/metrics.md ("Series arithmetic"), issue 19.

One ``serve`` polls the host's namespace and nine of this test's: eight pod-like namespaces,
each with 200 listeners that clients connected to, 300 destinations it called and 30 it holds a
connection to, and the "servers" namespace they all reach over veth pairs (127.1.N.x addresses,
``route_localnet``: nothing leaves 127.0.0.0/8). Every series of the scrape is put in one of the
arithmetic's kinds (per scrape, the tracepoints reader's own, per namespace, per listener, per
destination, per process, per peer row of either source, per finding); a family of no kind
fails the test, so a new family says what it costs.
Then each kind is held to its documented price.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.peer_budget import PEER_SERIES_TARGET, SERIES_PER_ROW
from tcpwatch.render.families.counters import SLOWNESS_COUNTERS
from tcpwatch.render.families.inbound import LIVE_FAMILIES
from tcpwatch.sources.lifecycle_peers import DEFAULT_MAX_PEERS
from tests.integration.netns import Netns
from tests.integration.test_lifecycle_serve import wait_for_lifecycle
from tests.integration.test_peer_budget import PER_PEER, accept_on, connect, link, serving
from tests.integration.test_serve import Samples

pytestmark = pytest.mark.integration

PODS = 8
LISTENERS = 200  # per pod
DESTINATIONS = 300  # per pod, called once each
HELD = 30  # per pod, destinations with a live connection (more than top_destinations)
TOP_DESTINATIONS = 20  # collect.top_destinations' default
LISTEN_PORT = 24000
CALLED_PORT = 21000
HELD_PORT = 23000

# The documented prices (docs/metrics.md, "Series arithmetic").
PER_SCRAPE = 25
# The tracepoints reader's own counts, once per scrape: records and undelivered per event
# (6 each), lost, other namespaces, buffer, sockets followed; and unattributed per (event,
# reason) seen, of 14.
READER_MIN = 16
READER_MAX = READER_MIN + 14
BASE_BESIDE_HOST = 105  # a namespace beside the host's, its differing tunables aside
BASE_HOST = 123  # the host's namespace, its tunables aside
PER_LISTENER = 5
PER_DESTINATION = 7
LIVE_ROWS = CollectSettings().live_peers  # host-wide rows of the live per-peer gauges
LIVE = {name for name, _, _ in LIVE_FAMILIES}

SCRAPE = {
    "tcpwatch_build_info",
    "tcpwatch_netns_polled",
    "tcpwatch_last_poll_timestamp_seconds",
    "tcpwatch_page_size_bytes",
    "tcpwatch_poll_duration_seconds_bucket",
    "tcpwatch_poll_duration_seconds_sum",
    "tcpwatch_poll_duration_seconds_count",
    "python_info",
}
LISTENER = {
    "tcpwatch_listener_drops_total",
    "tcpwatch_listen_queue_length",
    "tcpwatch_listen_queue_max",
    "tcpwatch_listen_syn_recv",
    "tcpwatch_listener_info",
}
DESTINATION = {
    "tcpwatch_ephemeral_ports_used",
    "tcpwatch_destination_established",
    "tcpwatch_destination_rtt_seconds",
    "tcpwatch_destination_rtt_max_seconds",
    "tcpwatch_destination_retransmits_in_flight",
    "tcpwatch_destination_segments_retransmitted",
    "tcpwatch_destination_segments_sent",
}
PROCESS = {
    "tcpwatch_process_sockets",
    "tcpwatch_process_open_fds",
    "tcpwatch_process_max_fds",
    "tcpwatch_process_max_fds_hard",
    "tcpwatch_process_start_time_seconds",
}
BASE = {
    "tcpwatch_sockets",
    "tcpwatch_established_dumped",
    "tcpwatch_sysctl",
    "tcpwatch_orphan_sockets",
    "tcpwatch_tcp_memory_bytes",
    "tcpwatch_ephemeral_port_range_size",
    "tcpwatch_ephemeral_destinations",
    "tcpwatch_ephemeral_scan_timestamp_seconds",
    "tcpwatch_process_scan_complete",
    "tcpwatch_process_scan_denied_processes",
    "tcpwatch_netns_info",
    "tcpwatch_lifecycle_events_total",
    "tcpwatch_lifecycle_events_lost_total",
    "tcpwatch_lifecycle_overruns_total",
    "tcpwatch_lifecycle_events_ignored_total",
    "tcpwatch_lifecycle_datagrams_malformed_total",
    "tcpwatch_lifecycle_peers_evicted_total",
    "tcpwatch_connections_folded_total",
    "tcpwatch_connections_unjoined_total",
    "tcpwatch_tracepoint_folded_total",
    "tcpwatch_source_up",
    "tcpwatch_source_degraded",
    "tcpwatch_source_duration_seconds",
    "tcpwatch_source_errors_total",
    # the namespace's kernel counters
    "tcpwatch_listen_overflows_total",
    "tcpwatch_listen_drops_total",
    "tcpwatch_syn_queue_drops_total",
    "tcpwatch_syn_queue_cookies_total",
    "tcpwatch_syncookies_sent_total",
    "tcpwatch_syncookies_received_total",
    "tcpwatch_syncookies_failed_total",
    "tcpwatch_timewait_overflows_total",
    "tcpwatch_tcp_active_opens_total",
    "tcpwatch_tcp_passive_opens_total",
    "tcpwatch_tcp_attempt_fails_total",
    "tcpwatch_tcp_established_resets_total",
    "tcpwatch_tcp_resets_sent_total",
    "tcpwatch_tcp_segments_sent_total",
    "tcpwatch_tcp_segments_retransmitted_total",
    "tcpwatch_tcp_retransmission_timeouts_total",
    "tcpwatch_tcp_syn_retransmits_total",
    "tcpwatch_tcp_aborts_on_timeout_total",
    "tcpwatch_tcp_aborts_on_data_total",
    "tcpwatch_tcp_aborts_on_close_total",
    "tcpwatch_tcp_aborts_on_memory_total",
    "tcpwatch_tcp_aborts_on_linger_total",
    # the namespace's counters of windows and receive-side drops (docs/metrics.md, "Who is slow")
    *(f"{name}_total" for _, name, _ in SLOWNESS_COUNTERS),
    # the listeners' live scan
    "tcpwatch_inbound_connections_scanned",
    "tcpwatch_inbound_scan_complete",
    "tcpwatch_inbound_scan_timestamp_seconds",
}

# Connects once to each [host, port] and keeps the connection; prints "held" when all are up.
_HOLDER = r"""
import json, socket, sys, time
targets = json.loads(sys.argv[1])
held = [socket.create_connection((host, port), timeout=10) for host, port in targets]
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""

# Accepts on every port given and keeps each connection open; prints "listening".
_KEEPER = r"""
import json, selectors, socket, sys, time
spec = json.loads(sys.argv[1])
selector = selectors.DefaultSelector()
for port in spec["ports"]:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((spec["host"], port))
    listener.listen(512)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
kept = []
print("listening", flush=True)
deadline = time.monotonic() + spec["seconds"]
while time.monotonic() < deadline:
    for key, _ in selector.select(0.5):
        try:
            kept.append(key.fileobj.accept()[0])
        except BlockingIOError:
            pass
"""


READER = {
    "tcpwatch_tracepoint_records_total",
    "tcpwatch_tracepoint_records_lost_total",
    "tcpwatch_tracepoint_records_undelivered_total",
    "tcpwatch_tracepoint_records_unattributed_total",
    "tcpwatch_tracepoint_records_other_netns_total",
    "tcpwatch_tracepoint_buffer_bytes",
    "tcpwatch_tracepoint_sockets_followed",
}


def kind(name: str) -> str:
    if name in SCRAPE or name.startswith("process_"):
        return "scrape"
    if name in READER:
        return "reader"
    for label, names in (
        ("finding", {"tcpwatch_finding"}),
        ("listener", LISTENER),
        ("destination", DESTINATION),
        ("live", LIVE),
        ("process", PROCESS),
        ("peer", set(PER_PEER)),
        ("base", BASE),
    ):
        if name in names:
            return label
    raise AssertionError(
        f"{name}: a family of no kind; say what it costs in docs/metrics.md "
        "('Series arithmetic') and give it its kind in tests/integration/test_node_series.py"
    )


def test_a_worst_case_node_costs_what_the_arithmetic_says(
    integration_prerequisites: None, tmp_path: Path
) -> None:
    run = secrets.token_hex(3)
    seconds = 300.0
    with ExitStack() as stack:
        servers = stack.enter_context(Netns(f"twn{run}"))
        pods = [stack.enter_context(Netns(f"twn{run}")) for _ in range(PODS)]
        hosts = range(10, 20)
        called = range(CALLED_PORT, CALLED_PORT + DESTINATIONS // len(hosts))
        kept = range(HELD_PORT, HELD_PORT + HELD // len(hosts))
        addresses = []
        for index, pod in enumerate(pods):
            pod_address, _ = link(pod, servers, index)
            addresses.append(pod_address)
            batch = "".join(f"addr add 127.1.{index}.{k}/24 dev tws{index}\n" for k in hosts)
            servers.run("sh", "-c", f"printf '{batch}' | ip -batch -")
            accept_on(pod, pod_address, range(LISTEN_PORT, LISTEN_PORT + LISTENERS), seconds)
        accept_on(servers, "0.0.0.0", called, seconds)
        spec = {"host": "0.0.0.0", "ports": list(kept), "seconds": seconds}
        keeper = servers.spawn([sys.executable, "-c", _KEEPER, json.dumps(spec)], seconds + 10)
        assert servers.read_line(keeper, timeout=30) == "listening", servers.stderr_of(keeper)
        for index, pod in enumerate(pods):
            targets = [(f"127.1.{index}.{k}", port) for k in hosts for port in kept]
            holder = pod.spawn([sys.executable, "-c", _HOLDER, json.dumps(targets), "280"], 290)
            assert pod.read_line(holder, timeout=30) == "held", pod.stderr_of(holder)
        control = stack.enter_context(Netns(f"twc{run}"))
        served = stack.enter_context(
            serving(control, tmp_path, 19482, "--netns", f"host,twn{run}-*", "--interval", "2")
        )
        for pod in pods:
            wait_for_lifecycle(served, pod.name)
        for index, pod in enumerate(pods):
            # every listener of the pod gets a client, every destination a call
            inbound = [
                (addresses[index], port, 1) for port in range(LISTEN_PORT, LISTEN_PORT + LISTENERS)
            ]
            assert connect(servers, inbound) == LISTENERS
            outbound = [(f"127.1.{index}.{k}", port, 1) for k in hosts for port in called]
            assert connect(pod, outbound) == DESTINATIONS
        scrape = served.wait_for_polls(served.polls() + 2, timeout=60)
    check(scrape, {pod.name for pod in pods}, servers.name)


def check(scrape: Samples, pods: set[str], servers: str) -> None:
    kinds: Counter[str] = Counter()
    per_netns: dict[str, Counter[str]] = defaultdict(Counter)
    sysctls: dict[str, dict[str, float]] = defaultdict(dict)
    listeners: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for (name, labels), value in scrape.items():
        found = dict(labels)
        what = kind(name)
        kinds[what] += 1
        netns = found.get("netns", "")
        per_netns[netns][what] += 1
        if name == "tcpwatch_sysctl":
            sysctls[netns][found["name"]] = value
        if name in LISTENER:
            listeners[netns].add((found["address"], found["port"], found["socket"]))
    polled = set(per_netns) - {""}
    assert polled == {"host", servers, *pods}, polled
    report = {netns: dict(counts) for netns, counts in sorted(per_netns.items())}
    print(json.dumps({"kinds": dict(kinds), "total": len(scrape), "per_netns": report}))

    assert kinds["scrape"] == PER_SCRAPE
    assert READER_MIN <= kinds["reader"] <= READER_MAX, kinds  # the tracepoints source ran
    host = sysctls["host"]
    for netns in polled:
        counts = per_netns[netns]
        tunables = len(sysctls[netns])
        if netns == "host":
            assert counts["base"] - tunables == BASE_HOST, counts
        else:
            assert counts["base"] - tunables == BASE_BESIDE_HOST, (netns, counts)
            differing = {n for n, v in sysctls[netns].items() if host.get(n) != v}
            assert set(sysctls[netns]) == differing  # the host's values are not repeated
        assert counts["listener"] <= PER_LISTENER * len(listeners[netns]), (netns, counts)
        assert counts["destination"] <= PER_DESTINATION * TOP_DESTINATIONS, (netns, counts)
    for pod in pods:
        assert len(listeners[pod]) == LISTENERS
        # the worst case is built: every listener and the top destinations, live ones included
        assert per_netns[pod]["listener"] >= 4 * LISTENERS
        assert per_netns[pod]["destination"] == PER_DESTINATION * TOP_DESTINATIONS
    assert kinds["live"] <= LIVE_ROWS * len(LIVE)  # host-wide, however many namespaces
    assert kinds["live"] >= len(LIVE) // 2  # the scans saw live peers (held, accepted)
    rows = DEFAULT_MAX_PEERS
    assert kinds["peer"] <= rows * SERIES_PER_ROW <= PEER_SERIES_TARGET
    assert kinds["peer"] >= (rows - 2 * len(polled)) * (SERIES_PER_ROW - 2)  # the budget is used
    budget = (
        PER_SCRAPE
        + READER_MAX
        + kinds["finding"]
        + sum(
            (BASE_HOST if netns == "host" else BASE_BESIDE_HOST) + len(sysctls[netns])
            for netns in polled
        )
        + PER_LISTENER * sum(len(found) for found in listeners.values())
        + PER_DESTINATION * TOP_DESTINATIONS * len(polled)
        + kinds["process"]
        + LIVE_ROWS * len(LIVE)
        + rows * SERIES_PER_ROW
    )
    assert len(scrape) <= budget, (len(scrape), budget)
