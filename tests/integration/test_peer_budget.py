"""The per-peer rows of closed connections under a host-wide budget, with a real ``serve``
(issue 21 item 12, issue 19 item 1). The whole scrape of a worst-case node: test_node_series.py.

Pod-like namespaces reach a "servers" namespace over veth pairs. The addresses are loopback ones
(127.1.N.1 and 127.1.N.2, with ``route_localnet`` on both ends), so no traffic is ever addressed
outside 127.0.0.0/8, and every address lives in a namespace this test made. A helper in the
servers namespace accepts and closes on hundreds of ports; one in each pod connects to them.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tcpwatch.peer_budget import PEER_SERIES_TARGET, SERIES_PER_ROW
from tests.integration.netns import Netns
from tests.integration.test_lifecycle_serve import wait_for_lifecycle
from tests.integration.test_serve import Samples, Served, matching, start_serve

pytestmark = pytest.mark.integration

FIRST_PORT = 21000
PER_PEER = (
    "tcpwatch_connections_closed_total",
    "tcpwatch_connection_rtt_seconds_bucket",
    "tcpwatch_connection_rtt_seconds_sum",
    "tcpwatch_connection_rtt_seconds_count",
    "tcpwatch_connection_segments_sent_total",
    "tcpwatch_connection_segments_retransmitted_total",
    "tcpwatch_connection_bytes_sent_total",
    "tcpwatch_connection_bytes_received_total",
    "tcpwatch_connection_busy_seconds_total",
    "tcpwatch_connection_rwnd_limited_seconds_total",
    "tcpwatch_connection_sndbuf_limited_seconds_total",
    "tcpwatch_connection_zero_window_closes_total",
    # the tracepoints' rows, under the same host-wide budget (tcpwatch/peer_budget.py)
    "tcpwatch_connect_duration_seconds_bucket",
    "tcpwatch_connect_duration_seconds_sum",
    "tcpwatch_connect_duration_seconds_count",
    "tcpwatch_connect_failures_total",
    "tcpwatch_connect_syn_retransmits_total",
    "tcpwatch_peer_resets_sent_total",
    "tcpwatch_peer_resets_received_total",
    "tcpwatch_packet_drops_total",
)

# Accepts on every port given and closes at once; prints "listening" when all are bound.
_ACCEPTOR = r"""
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
print("listening", flush=True)
deadline = time.monotonic() + spec["seconds"]
while time.monotonic() < deadline:
    for key, _ in selector.select(0.5):
        try:
            conn, _ = key.fileobj.accept()
        except BlockingIOError:
            continue
        conn.close()
"""

# Connects `count` times to each [host, port], waits for the server's close, closes; prints the
# number of connections that completed.
_CONNECTOR = r"""
import json, socket, sys
done = 0
for host, port, count in json.loads(sys.argv[1]):
    for _ in range(count):
        with socket.create_connection((host, port), timeout=10) as sock:
            while sock.recv(64):
                pass
        done += 1
print(done, flush=True)
"""


def link(pod: Netns, servers: Netns, index: int) -> tuple[str, str]:
    """A veth pair between the two namespaces; (pod address, servers address)."""
    pod_if, servers_if = f"twp{index}", f"tws{index}"
    pod.run("ip", "link", "add", pod_if, "type", "veth", "peer", "name", servers_if,
            "netns", servers.name)  # fmt: skip
    addresses = (f"127.1.{index}.1", f"127.1.{index}.2")
    for ns, interface, address in (
        (pod, pod_if, addresses[0]),
        (servers, servers_if, addresses[1]),
    ):
        ns.sysctl("net.ipv4.conf.all.route_localnet", 1)
        ns.sysctl(f"net.ipv4.conf.{interface}.route_localnet", 1)
        ns.run("ip", "addr", "add", f"{address}/24", "dev", interface)
        ns.run("ip", "link", "set", interface, "up")
    return addresses


def accept_on(ns: Netns, host: str, ports: Iterable[int], seconds: float = 240) -> None:
    spec = {"host": host, "ports": list(ports), "seconds": seconds}
    helper = ns.spawn([sys.executable, "-c", _ACCEPTOR, json.dumps(spec)], lifetime=seconds + 10)
    line = ns.read_line(helper, timeout=30)
    assert line == "listening", f"acceptor said {line!r}: {ns.stderr_of(helper)}"


def connect(ns: Netns, targets: Sequence[tuple[str, int, int]]) -> int:
    result = ns.run(sys.executable, "-c", _CONNECTOR, json.dumps(targets), timeout=240)
    return int(result.stdout.strip())


def per_peer_series(samples: Samples, netns: str | None = None) -> int:
    return sum(
        1
        for (name, labels) in samples
        if name in PER_PEER and (netns is None or ("netns", netns) in labels)
    )


def closed_ok(samples: Samples, netns: str) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["direction"], dict(labels)["peer"]): value
        for labels, value in matching(
            samples, "tcpwatch_connections_closed_total", netns=netns, outcome="ok"
        ).items()
    }


def assert_monotonic(scrapes: Sequence[Samples]) -> None:
    """No counter of a series present in two scrapes went down between them."""
    for before, after in itertools.pairwise(scrapes):
        for key, value in after.items():
            if key[0].endswith(("_total", "_bucket", "_sum", "_count")) and key in before:
                assert value >= before[key], f"{key} went from {before[key]} to {value}"


@contextmanager
def serving(ns: Netns, tmp_path: Path, port: int, *args: str) -> Iterator[Served]:
    served = start_serve(
        ns, tmp_path / "serve.log", "--listen", f"127.0.0.1:{port}", "--interval", "1", *args
    )
    served.port = port
    try:
        served.wait_ready()
        yield served
    finally:
        served.process.kill()
        served.process.wait(timeout=10)


def test_rows_go_to_the_busiest_peers_and_to_a_new_listener(
    integration_prerequisites: None, tmp_path: Path
) -> None:
    """Issue 21 item 12: 150 quiet destinations fill more than the budget (and the tracker);
    then a new busy destination and a new listener each get their own row, with every close."""
    rows = 60  # the tracker holds 2 x 60 = 120 pairs: the 150 quiet ones overflow it too
    config = tmp_path / "tcpwatch.yaml"
    config.write_text(f"collect:\n  connection_peers: {rows}\n")
    with Netns("tw-pod") as pod, Netns("tw-srv") as servers:
        pod_address, server_address = link(pod, servers, 0)
        accept_on(servers, "0.0.0.0", [*range(FIRST_PORT, FIRST_PORT + 150), 22000])
        with serving(pod, tmp_path, 19480, "--config", str(config)) as served:
            wait_for_lifecycle(served, pod.name)
            quiet = [(server_address, FIRST_PORT + n, 2) for n in range(150)]
            assert connect(pod, quiet) == 300
            first = served.wait_for_polls(served.polls() + 1)
            assert 0 < per_peer_series(first) <= rows * SERIES_PER_ROW
            # a new listener of the pod, and a destination far busier than any before
            accept_on(pod, pod_address, [23000])
            assert connect(servers, [(pod_address, 23000, 5)]) == 5
            assert connect(pod, [(server_address, 22000, 400)]) == 400
            second = served.wait_for_polls(served.polls() + 1)
            third = served.wait_for_polls(served.polls() + 1)
    got = closed_ok(third, pod.name)
    assert got[("outbound", f"{server_address}:22000")] == 400  # every close under its own row
    assert got[("inbound", f"{pod_address}:23000")] == 5
    assert len({key for key in got}) <= rows
    assert per_peer_series(third) <= rows * SERIES_PER_ROW
    folded = matching(third, "tcpwatch_connections_folded_total", netns=pod.name)
    assert sum(folded.values()) > 0  # the quiet ones that found no row were counted
    assert_monotonic([first, second, third])


PODS = 8
DESTINATIONS = 300
SERIES_BUDGET = PEER_SERIES_TARGET  # the per-peer series of a whole node, whatever the traffic
PODS_BUDGET = 4000  # everything the 8 pods export


def test_a_node_of_busy_pods_stays_inside_the_series_budget(
    integration_prerequisites: None, tmp_path: Path
) -> None:
    """Issue 19 item 1: 8 pod-like namespaces, each calling 300 destinations over a veth (20,272
    series for those 8 before), scraped from one `serve --netns all`."""
    with ExitStack() as stack:
        servers = stack.enter_context(Netns("tw-srv"))
        pods = [stack.enter_context(Netns("tw-pod")) for _ in range(PODS)]
        # 10 addresses x 30 ports: few neighbours (the ARP table is shared by every namespace
        # and holds 1,024), few listeners on the servers' side (each gets a row first)
        hosts = range(10, 20)
        ports = range(FIRST_PORT, FIRST_PORT + DESTINATIONS // len(hosts))
        for index, pod in enumerate(pods):
            link(pod, servers, index)
            batch = "".join(f"addr add 127.1.{index}.{k}/24 dev tws{index}\n" for k in hosts)
            servers.run("sh", "-c", f"printf '{batch}' | ip -batch -")
        accept_on(servers, "0.0.0.0", ports)
        control = stack.enter_context(Netns("tw-ctl"))
        served = stack.enter_context(
            serving(control, tmp_path, 19481, "--netns", "all", "--interval", "2")
        )
        for pod in pods:
            wait_for_lifecycle(served, pod.name)
        opened = 0
        for index, pod in enumerate(pods):
            # pod N calls each of its 300 destinations N + 1 times: the pods differ in how busy
            destinations = [(f"127.1.{index}.{k}", port, index + 1)
                            for k in hosts for port in ports]  # fmt: skip
            opened += connect(pod, destinations)
        scrapes = [served.wait_for_polls(served.polls() + 1) for _ in range(3)]
    samples = scrapes[-1]
    names = {pod.name for pod in pods}
    assert opened == DESTINATIONS * PODS * (PODS + 1) // 2
    node = per_peer_series(samples)
    assert node <= SERIES_BUDGET, f"{node} per-peer series on the node"
    ours = sum(1 for _, labels in samples if dict(labels).get("netns") in names)
    assert ours <= PODS_BUDGET, f"the {PODS} pods export {ours} series"
    # A pod's closes are under its own rows, folded (and counted), or under a row that lost its
    # place to a busier pod's peer (held: remembered, not exported), never counted twice.
    folded_total = 0.0
    for index, pod in enumerate(pods):
        got = closed_ok(samples, pod.name)
        own = sum(v for (d, peer), v in got.items() if d == "outbound" and peer != "other")
        folded = sum(
            matching(samples, "tcpwatch_connections_folded_total", netns=pod.name).values()
        )
        other = got.get(("outbound", "other"), 0.0)
        assert other <= folded and own + folded <= DESTINATIONS * (index + 1), pod.name
        folded_total += folded
    assert folded_total > 0
    assert_monotonic(scrapes)
    print(f"node per-peer series {node}; the {PODS} pods' series {ours}")
