"""Closed connections through the whole pipeline: a real ``tcpwatch serve`` in throw-away
namespaces, its /metrics against ``ss -tinE`` run beside it (the oracle helpers of
test_lifecycle_netns.py), two namespaces polled at once, and an unprivileged serve with the unit's
capabilities receiving the events.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import Netns
from tests.integration.test_lifecycle_netns import (
    MARKER_PORT,
    TRAFFIC,
    Expected,
    SsEvent,
    oracle,
    parse_ss_events,
    ss_count,
)
from tests.integration.test_privileges import (  # noqa: F401  (runtime: a fixture)
    GET,
    SYSTEM_PYTHON,
    Runtime,
    as_nobody,
    runtime,
    unit_capabilities,
)
from tests.integration.test_serve import Samples, Served, matching, parse_samples, start_serve

pytestmark = pytest.mark.integration

PORT = 19478
WAIT = 30.0


def traffic(ns: Netns, *specs: Mapping[str, Any]) -> dict[str, Any]:
    result = ns.run(sys.executable, "-c", TRAFFIC, json.dumps(list(specs)), timeout=120)
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def normal(name: str, host: str, port: int, count: int, send: int = 10) -> dict[str, Any]:
    return {"kind": "normal", "name": name, "host": host, "port": port, "count": count,
            "send": send, "reply": 300}  # fmt: skip


def failing(name: str, port: int, count: int, blocking: bool) -> dict[str, Any]:
    return {"kind": "failing", "name": name, "host": "127.0.0.1", "port": port, "count": count,
            "blocking": blocking}  # fmt: skip


class SsWatch:
    """``ss -tinEH`` running in a namespace, its output in a file."""

    def __init__(self, ns: Netns, directory: Path) -> None:
        self.ns = ns
        self.path = directory / f"{ns.name}-ss.txt"
        ns.spawn(["sh", "-c", f"exec stdbuf -oL ss -tinEH > {self.path}"], lifetime=300)

    def events(self) -> list[SsEvent]:
        return parse_ss_events(self.path.read_text()) if self.path.exists() else []

    def wait(self, predicate: Callable[[list[SsEvent]], bool], what: str) -> list[SsEvent]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            events = self.events()
            if predicate(events):
                return events
            time.sleep(0.1)
        raise AssertionError(f"ss -tinE never showed {what}: {self.events()}")

    def sync(self) -> None:
        """A marker connection ss has printed: its subscription is live from here on."""
        for _ in range(10):
            traffic(self.ns, normal("marker", "127.0.0.1", MARKER_PORT, 1))
            time.sleep(0.3)
            if any(MARKER_PORT in (e.local_port, e.peer_port) for e in self.events()):
                return
        raise AssertionError("ss -tinE never printed the marker connection")


@contextmanager
def scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="tw-lifecycle-serve-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def wait_for_lifecycle(served: Served, netns: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        up = matching(served.metrics(), "tcpwatch_source_up", netns=netns, source="lifecycle")
        if list(up.values()) == [1.0]:
            return
        time.sleep(0.2)
    raise AssertionError(f"the lifecycle source never came up in {netns}: {served.log()}")


def settled(served: Served) -> Samples:
    """Metrics from a poll that started after everything so far had happened."""
    return served.wait_for_polls(served.polls() + 1)


def from_metrics(samples: Samples, netns: str, skip_ports: Sequence[int]) -> Expected:
    """The exposition's per-peer counters in the oracle's shape (non-zero values only)."""
    result = Expected()

    def skipped(peer: str) -> bool:
        return any(peer.endswith(f":{port}") for port in skip_ports)

    for labels, value in matching(
        samples, "tcpwatch_connections_closed_total", netns=netns
    ).items():
        found = dict(labels)
        if value and not skipped(found["peer"]):
            result.closed[(found["direction"], found["peer"], found["outcome"])] += int(value)
    metrics = {
        "segments_sent": "tcpwatch_connection_segments_sent_total",
        "segments_retransmitted": "tcpwatch_connection_segments_retransmitted_total",
        "bytes_sent": "tcpwatch_connection_bytes_sent_total",
        "bytes_received": "tcpwatch_connection_bytes_received_total",
        "rtt_count": "tcpwatch_connection_rtt_seconds_count",
    }
    for key, name in metrics.items():
        for labels, value in matching(samples, name, netns=netns).items():
            found = dict(labels)
            if value and not skipped(found["peer"]):
                row = result.sums.setdefault((found["direction"], found["peer"]), Counter())
                row[key] += int(value)
    return result


def nonzero(sums: Mapping[tuple[str, str], Counter[str]]) -> dict[tuple[str, str], dict[str, int]]:
    return {key: {k: v for k, v in row.items() if v} for key, row in sums.items() if +row}


def test_serve_exports_what_ss_printed_per_peer_and_outcome(netns: Netns, tmp_path: Path) -> None:
    netns.sysctl("net.ipv4.tcp_syn_retries", 1)  # a dropped SYN times out in ~3 s
    netns.nft(
        "table inet lifecycle {\n"
        "  chain input { type filter hook input priority 0;\n"
        "    tcp dport 20704 tcp flags syn drop\n  }\n}\n"
    )
    with scratch() as directory:
        ss = SsWatch(netns, directory)
        served = start_serve(
            netns, tmp_path / "serve.log", "--listen", f"127.0.0.1:{PORT}", "--interval", "1"
        )
        served.port = PORT
        try:
            served.wait_ready()
            wait_for_lifecycle(served, netns.name)
            ss.sync()
            seen = traffic(
                netns,
                normal("v4", "127.0.0.1", 20701, 20, send=1000),
                normal("v6", "::1", 20702, 10, send=2000),
                failing("nb-refused", 20703, 4, blocking=False),
                failing("b-refused", 20703, 2, blocking=True),
                failing("nb-timeout", 20704, 3, blocking=False),
            )
            events = ss.wait(
                lambda ev: (
                    ss_count(20701, 40)(ev) and ss_count(20702, 20)(ev) and ss_count(20704, 3)(ev)
                ),
                "every connection",
            )
            time.sleep(0.5)  # the blocking refusals (port cleared) are not matched by port
            events = ss.events()
            samples = settled(served)
        finally:
            served.process.kill()
            served.process.wait(timeout=10)
    assert seen["nb-refused"] == {"ECONNREFUSED": 4}
    assert seen["b-refused"] == {"ECONNREFUSED": 2}
    assert seen["nb-timeout"] == {"ETIMEDOUT": 3}
    skip = [PORT, MARKER_PORT]
    expected = oracle(events, {20701: "127.0.0.1:20701", 20702: "[::1]:20702"}, skip)
    # ss -E prints the blocking refusals as the kernel left them (port cleared: 127.0.0.1,
    # aborted); serve joins them to the tracepoints' error reports, and counts them where the
    # client itself was refused (seen["b-refused"]): 127.0.0.1:20703, refused.
    cleared = expected.closed.pop(("outbound", "127.0.0.1", "aborted"), 0)
    assert cleared == 2, expected.closed
    expected.closed[("outbound", "127.0.0.1:20703", "refused")] += cleared
    bare = expected.sums.pop(("outbound", "127.0.0.1"), None)
    if bare is not None:
        expected.sums.setdefault(("outbound", "127.0.0.1:20703"), Counter()).update(bare)
    got = from_metrics(samples, netns.name, skip)
    assert dict(got.closed) == dict(expected.closed)
    assert nonzero(got.sums) == nonzero(expected.sums)
    # the outcomes the traffic was built for, under the peer it went to
    assert got.closed[("outbound", "127.0.0.1:20701", "ok")] == 20
    assert got.closed[("inbound", "127.0.0.1:20701", "ok")] == 20
    assert got.closed[("outbound", "[::1]:20702", "ok")] == 10
    assert got.closed[("outbound", "127.0.0.1:20703", "refused")] == 4 + 2  # 2 joined
    assert got.closed[("outbound", "127.0.0.1:20704", "timeout")] == 3
    assert ("outbound", "127.0.0.1", "aborted") not in got.closed
    sent = sum(1000 + n for n in range(20))  # payload, plus the SYN and FIN of each
    assert got.sums[("outbound", "127.0.0.1:20701")]["bytes_sent"] == sent + 2 * 20

    def total(name: str) -> float:
        [found] = matching(samples, name, netns=netns.name).values()
        return found

    assert total("tcpwatch_lifecycle_events_lost_total") == 0
    assert total("tcpwatch_lifecycle_events_total") >= len(events)  # scrapes close some too
    # Every event heard is a closed connection of some peer or an ignored one (a closed
    # listener); none was malformed, no read overran, no peer was idle long enough to go.
    closed = sum(matching(samples, "tcpwatch_connections_closed_total", netns=netns.name).values())
    ignored = total("tcpwatch_lifecycle_events_ignored_total")
    assert total("tcpwatch_lifecycle_events_total") == ignored + closed
    assert ignored >= expected.ignored > 0  # tcpwatch subscribed before ss did
    assert total("tcpwatch_lifecycle_datagrams_malformed_total") == 0
    assert total("tcpwatch_lifecycle_overruns_total") == 0
    assert total("tcpwatch_lifecycle_peers_evicted_total") == 0


def test_two_namespaces_each_peer_in_its_own(
    integration_prerequisites: None, tmp_path: Path
) -> None:
    with Netns() as first, Netns() as second:
        served = start_serve(
            first,
            tmp_path / "serve.log",
            "--listen",
            f"127.0.0.1:{PORT}",
            "--interval",
            "1",
            "--netns",
            f"{first.name},{second.name}",
        )
        served.port = PORT
        try:
            served.wait_ready()
            wait_for_lifecycle(served, first.name)
            wait_for_lifecycle(served, second.name)
            traffic(first, normal("n", "127.0.0.1", 20711, 3))
            traffic(second, normal("n", "127.0.0.1", 20711, 5))
            traffic(second, failing("refused", 20712, 2, blocking=False))
            samples = settled(served)
        finally:
            served.process.kill()
            served.process.wait(timeout=10)
    for ns, count in ((first, 3), (second, 5)):
        got = from_metrics(samples, ns.name, [PORT])
        assert got.closed[("outbound", "127.0.0.1:20711", "ok")] == count, ns.name
        assert got.closed[("inbound", "127.0.0.1:20711", "ok")] == count, ns.name
    assert (
        from_metrics(samples, second.name, [PORT]).closed[
            ("outbound", "127.0.0.1:20712", "refused")
        ]
        == 2
    )
    assert ("outbound", "127.0.0.1:20712", "refused") not in from_metrics(
        samples, first.name, [PORT]
    ).closed


def test_unprivileged_serve_with_the_units_capabilities_receives_events(
    netns: Netns,
    runtime: Runtime,  # noqa: F811
) -> None:
    daemon = netns.spawn(
        [
            *as_nobody(unit_capabilities()),
            *runtime.tcpwatch("serve", "--listen", f"127.0.0.1:{PORT}", "--interval", "1"),
        ],
        env=runtime.env(),
        lifetime=120,
    )
    url = f"http://127.0.0.1:{PORT}/metrics"

    def scrape() -> Samples:
        assert daemon.poll() is None, f"tcpwatch serve exited: {netns.stderr_of(daemon)}"
        result = netns.run(SYSTEM_PYTHON, "-c", GET, url, check=False)
        return parse_samples(result.stdout) if result.returncode == 0 else {}

    def wait(predicate: Callable[[Samples], bool], what: str) -> Samples:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            samples = scrape()
            if predicate(samples):
                return samples
            time.sleep(0.3)
        raise AssertionError(f"never {what}; daemon stderr: {netns.stderr_of(daemon)}")

    def lifecycle_up(samples: Samples) -> bool:
        up = matching(samples, "tcpwatch_source_up", source="lifecycle")
        return list(up.values()) == [1.0]

    wait(lifecycle_up, "the lifecycle source up")
    traffic(netns, normal("n", "127.0.0.1", 20721, 7))
    traffic(netns, failing("refused", 20722, 3, blocking=False))

    def counted(samples: Samples) -> bool:
        got = from_metrics(samples, netns.name, [PORT])
        return (
            got.closed[("outbound", "127.0.0.1:20721", "ok")] == 7
            and got.closed[("outbound", "127.0.0.1:20722", "refused")] == 3
        )

    samples = wait(counted, "the connections counted")
    got = from_metrics(samples, netns.name, [PORT])
    assert got.closed[("inbound", "127.0.0.1:20721", "ok")] == 7
    assert list(matching(samples, "tcpwatch_lifecycle_events_lost_total").values()) == [0.0]
