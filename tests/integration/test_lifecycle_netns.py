"""Closed-connection events from the real kernel, with ``ss -tinE`` beside them as the oracle.

Each test makes throw-away namespaces and starts, inside each:

* ``ss -tinEH`` (line-buffered into a file): every destroyed TCP socket with its tcp_info;
* a reader process: a DestroyListener created in the namespace, reading whenever its socket is
  readable until a stop file appears, then printing ``drain()`` as JSON;
* traffic (stdlib Python) whose outcomes are known: completed connections with known byte
  counts, SYNs dropped by nftables (``tcp_syn_retries`` lowered in the namespace only),
  refusals, SO_LINGER 0 aborts, random loss, IPv6.

ss's events are classified here independently, from its text (peer as ss prints it, port ``*``
= cleared by tcp_disconnect), and must equal the reader's per-(direction, peer, outcome) counts
and per-(direction, peer) sums. Every wait is bounded; the namespaces go away even on failure.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.snapshot import poll
from tcpwatch.sources.lifecycle import DEFAULT_RECEIVE_BUFFER
from tests.integration import populations
from tests.integration.netns import REPO_ROOT, Netns, tcpwatch_env
from tests.integration.test_privileges import as_nobody, unit_capabilities

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3"
PORT_RANGE = (32768, 60999)  # a new namespace's ip_local_port_range
MARKER_PORT = 20699
WAIT = 30.0

READER = r"""
import dataclasses, json, os, select, sys, time
from tcpwatch.sources.lifecycle import DestroyListener
from tcpwatch.sources.lifecycle_peers import table_of
args = json.loads(sys.argv[1])
listener = DestroyListener(**args["options"])
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    low, high = (int(word) for word in f.read().split())
listener.update_context(
    frozenset(args["ports"]), (low, high), [tuple(item) for item in args["listeners"]]
)
print("ready", flush=True)
deadline = time.monotonic() + args["lifetime"]
cpu = 0.0
while not os.path.exists(args["stop"]) and time.monotonic() < deadline:
    if os.path.exists(args["pause"]):  # the test holds the reader back (a burst must overflow)
        time.sleep(0.02)
        continue
    readable, _, _ = select.select([listener], [], [], 0.05)
    if readable:
        start = time.thread_time()
        listener.read_ready()
        cpu += time.thread_time() - start
listener.read_ready()
stats = dataclasses.asdict(table_of(listener.drain()))  # one drain: everything since start
listener.close()
stats["reader_cpu_seconds"] = cpu
print(json.dumps(stats), flush=True)
"""

# Runs the actions of a JSON list at once (threads); prints what each connection saw.
TRAFFIC = r"""
import errno, json, select, socket, struct, sys, threading
from collections import Counter
results = {}
lock = threading.Lock()

def note(name, value):
    with lock:
        results.setdefault(name, Counter()).update([value])

def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def serve(listener, count, action):
    for n in range(count):
        conn, _ = listener.accept()
        with conn:
            action(conn, n)

def recv_exactly(conn, size):
    got = 0
    while got < size:
        chunk = conn.recv(min(65536, size - got))
        if not chunk:
            break
        got += len(chunk)
    return got

def normal(spec):
    host, port, count = spec["host"], spec["port"], spec["count"]
    listener = socket.socket(family(host))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((spec.get("bind", host), port))
    listener.listen(128)
    def answer(conn, n):
        got = recv_exactly(conn, spec["send"] + n)
        conn.sendall(b"r" * spec["reply"])
        note(spec["name"], f"server got {got == spec['send'] + n}")
        recv_exactly(conn, 1)  # the client's FIN: the client closes first
    server = threading.Thread(target=serve, args=(listener, count, answer))
    server.start()
    for n in range(count):
        with socket.create_connection((host, port), timeout=30) as client:
            client.sendall(b"s" * (spec["send"] + n))
            note(spec["name"], f"client got {recv_exactly(client, spec['reply']) == spec['reply']}")
    server.join(60)
    listener.close()

def linger0(spec):
    host, port, count = spec["host"], spec["port"], spec["count"]
    listener = socket.socket(family(host))
    listener.bind((host, port))
    listener.listen(128)
    def hold(conn, n):
        recv_exactly(conn, 100)
        try:
            recv_exactly(conn, 1)  # the client's reset ends it
        except ConnectionResetError:
            note(spec["name"], "server saw the reset")
    server = threading.Thread(target=serve, args=(listener, count, hold))
    server.start()
    for n in range(count):
        client = socket.create_connection((host, port), timeout=30)
        client.sendall(b"x" * 100)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        note(spec["name"], "reset")
    server.join(60)
    listener.close()

def failing(spec):
    host, port, count = spec["host"], spec["port"], spec["count"]
    def one():
        sock = socket.socket(family(host))
        try:
            if spec["blocking"]:
                try:
                    sock.connect((host, port))
                    note(spec["name"], "connected")
                except OSError as error:
                    note(spec["name"], errno.errorcode[error.errno])
                return
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code == errno.EINPROGRESS:
                select.select([], [sock], [], 30)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            note(spec["name"], errno.errorcode.get(code, "connected"))
        finally:
            sock.close()
    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

KINDS = {"normal": normal, "linger0": linger0, "failing": failing}
specs = json.loads(sys.argv[1])
threads = [threading.Thread(target=KINDS[spec["kind"]], args=(spec,)) for spec in specs]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(120)
print(json.dumps({name: dict(counts) for name, counts in results.items()}))
"""


# --- ss -tinE as the oracle -------------------------------------------------------------------


@dataclass(frozen=True)
class SsEvent:
    state: str  # "UNCONN" for destroyed sockets, "ESTAB" ...
    local: str  # "127.0.0.1:37850", "[::1]:8443"
    peer: str  # "127.0.0.1:8080", "127.0.0.1:*" (port cleared), "*:*", "0.0.0.0:*"
    info: Mapping[str, str]

    @property
    def local_port(self) -> int:
        return int(self.local.rpartition(":")[2])

    @property
    def peer_address(self) -> str:
        return self.peer.rpartition(":")[0].strip("[]")

    @property
    def peer_port(self) -> int | None:
        port = self.peer.rpartition(":")[2]
        return None if port == "*" else int(port)

    def number(self, key: str) -> int:
        return int(self.info.get(key, "0"))

    @property
    def total_retrans(self) -> int:
        return int(self.info["retrans"].split("/")[1]) if "retrans" in self.info else 0

    @property
    def rtt_us(self) -> int:
        """Smoothed RTT: ss prints tcpi_rtt / 1000 (ms) with up to three decimals."""
        return round(float(self.info["rtt"].split("/")[0]) * 1000) if "rtt" in self.info else 0


def parse_ss_events(text: str) -> list[SsEvent]:
    """``ss -tinEH`` output: a socket line, then an indented line of key:value tcp_info fields."""
    events: list[SsEvent] = []
    pending: tuple[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if pending is not None:
                events.append(SsEvent(*pending, {}))
            words = line.split()
            pending = (words[0], words[3], words[4])
            continue
        if pending is None:
            raise AssertionError(f"ss printed an info line before any socket: {line!r}")
        info = dict(word.split(":", 1) for word in line.split() if ":" in word)
        events.append(SsEvent(*pending, info))
        pending = None
    if pending is not None:
        events.append(SsEvent(*pending, {}))
    return events


@dataclass
class Expected:
    closed: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    sums: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    ignored: int = 0


def oracle(
    events: Sequence[SsEvent], listeners: Mapping[int, str], skip_ports: Sequence[int] = ()
) -> Expected:
    """What the reader must have counted, worked out from ss's text alone."""
    expected = Expected()
    low, high = PORT_RANGE
    for event in events:
        if event.peer_port is None and event.peer_address in ("*", "0.0.0.0", "::"):
            expected.ignored += 1
            continue
        if event.local_port in skip_ports or event.peer_port in skip_ports:
            continue
        inbound = event.local_port in listeners or not low <= event.local_port <= high
        if inbound:
            direction, peer = "inbound", listeners.get(event.local_port, event.local)
        elif event.peer_port is None:
            direction, peer = "outbound", event.peer_address
        else:
            direction, peer = "outbound", event.peer
        if event.peer_port is None:
            # Cleared by tcp_disconnect: ss prints minrtt and snd_wnd only when they hold a
            # sample and a window, i.e. when the handshake had completed before the clearing.
            worked = "minrtt" in event.info or event.number("snd_wnd")
            outcome = "ok" if worked else "aborted"
        elif event.number("delivered"):
            outcome = "ok"
        elif event.number("segs_in"):
            outcome = "refused"
        else:
            outcome = "timeout"
        expected.closed[(direction, peer, outcome)] += 1
        sums = expected.sums.setdefault((direction, peer), Counter())
        sums["segments_sent"] += event.number("segs_out")
        sums["segments_retransmitted"] += event.total_retrans
        sums["bytes_sent"] += event.number("bytes_acked")
        sums["bytes_received"] += event.number("bytes_received")
        if "rtt" in event.info:
            sums["rtt_count"] += 1
    return expected


def observed(stats: Mapping[str, Any], skip_ports: Sequence[int] = ()) -> Expected:
    """The reader's drain() in the oracle's shape (marker traffic left out)."""
    result = Expected(ignored=stats["ignored"])
    for row in stats["peers"]:
        if any(row["peer"].endswith(f":{port}") for port in skip_ports):
            continue
        for outcome, count in row["closed"].items():
            if count:
                result.closed[(row["direction"], row["peer"], outcome)] += count
        sums = result.sums.setdefault((row["direction"], row["peer"]), Counter())
        for key in ("segments_sent", "segments_retransmitted", "bytes_sent", "bytes_received"):
            if row[key]:
                sums[key] += row[key]
        if row["rtt_count"]:
            sums["rtt_count"] += row["rtt_count"]
    return result


# --- running it -------------------------------------------------------------------------------


@dataclass
class Watch:
    ns: Netns
    directory: Path
    reader: Any
    ss_path: Path

    def ss_events(self) -> list[SsEvent]:
        if not self.ss_path.exists():  # the shell that starts ss has not created it yet
            return []
        return parse_ss_events(self.ss_path.read_text())

    def wait_for_ss(
        self, predicate: Callable[[list[SsEvent]], bool], what: str, timeout: float = WAIT
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.ss_events()):
                return
            time.sleep(0.05)
        printed = self.ss_path.read_text() if self.ss_path.exists() else "(no output file)"
        raise AssertionError(f"ss -tinE never showed {what}; it printed:\n{printed}")

    def traffic(self, *specs: Mapping[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        result = self.ns.run(
            sys.executable, "-c", TRAFFIC, json.dumps(list(specs)), timeout=timeout
        )
        outcome: dict[str, Any] = json.loads(result.stdout)
        return outcome

    def sync(self) -> None:
        """One marker connection, seen by ss: both subscriptions are live from here on."""
        marker = {"kind": "normal", "name": "marker", "host": "127.0.0.1",
                  "port": MARKER_PORT, "count": 1, "send": 1, "reply": 1}  # fmt: skip
        for attempt in range(10):
            self.traffic(marker)
            try:
                self.wait_for_ss(
                    lambda ev: any(e.local_port == MARKER_PORT for e in ev), "marker", 1.0
                )
                return
            except AssertionError:
                if attempt == 9:
                    raise

    def pause(self) -> None:
        """The reader stops reading (its socket's buffer fills) until finish()."""
        (self.directory / "pause").touch()
        time.sleep(0.2)  # the reader's loop notices within 50 ms

    def finish(self, settle: Callable[[list[SsEvent]], bool] | None = None) -> dict[str, Any]:
        """Wait until ss has printed everything wanted, stop the reader, return its drain()."""
        if settle is not None:
            self.wait_for_ss(settle, "every expected event")
        time.sleep(0.2)  # the same multicast reaches both sockets; let the reader catch up
        (self.directory / "pause").unlink(missing_ok=True)
        (self.directory / "stop").touch()
        stats: dict[str, Any] = json.loads(self.ns.read_line(self.reader, timeout=WAIT))
        return stats


@contextmanager
def watching(
    ns: Netns,
    ports: Sequence[int] = (),
    listeners: Sequence[tuple[str, int]] = (),
    options: Mapping[str, Any] | None = None,
    prefix: Sequence[str] = (),
    python: str = sys.executable,
    pythonpath: str | None = None,
) -> Iterator[Watch]:
    directory = Path(tempfile.mkdtemp(prefix=f"{ns.name}-lifecycle-"))
    try:
        directory.chmod(0o755)
        ss_path = directory / "ss.txt"
        ns.spawn(["sh", "-c", f"exec stdbuf -oL ss -tinEH > {ss_path}"], lifetime=300)
        env = tcpwatch_env()
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        args = {
            "options": dict(options or {}),
            "ports": [*ports, MARKER_PORT],
            "listeners": [list(item) for item in listeners],
            "stop": str(directory / "stop"),
            "pause": str(directory / "pause"),
            "lifetime": 240,
        }
        reader = ns.spawn(
            [*prefix, python, "-c", READER, json.dumps(args)],
            lifetime=300,
            env=env,
            cwd=str(REPO_ROOT) if pythonpath is None else "/",
        )
        assert ns.read_line(reader, timeout=WAIT) == "ready", ns.stderr_of(reader)
        watch = Watch(ns, directory, reader, ss_path)
        watch.sync()
        yield watch
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ss_count(port: int, at_least: int) -> Callable[[list[SsEvent]], bool]:
    def enough(events: list[SsEvent]) -> bool:
        return sum(port in (e.local_port, e.peer_port) for e in events) >= at_least

    return enough


def assert_matches(expected: Expected, got: Expected) -> None:
    assert dict(got.closed) == dict(expected.closed)

    def nonzero(sums: dict[tuple[str, str], Counter[str]]) -> dict[tuple[str, str], dict[str, int]]:
        return {key: {name: v for name, v in row.items() if v} for key, row in sums.items()}

    assert nonzero(got.sums) == nonzero(expected.sums)


# --- the tests --------------------------------------------------------------------------------


def test_completed_connections_ipv4_and_ipv6_match_ss(netns: Netns) -> None:
    count = 40
    listeners = {20601: "127.0.0.1:20601", 20602: "[::1]:20602"}
    with watching(netns, [20601, 20602], [("127.0.0.1", 20601), ("::1", 20602)]) as watch:
        seen = watch.traffic(
            {"kind": "normal", "name": "v4", "host": "127.0.0.1", "port": 20601,
             "count": count, "send": 1000, "reply": 300},
            {"kind": "normal", "name": "v6", "host": "::1", "port": 20602,
             "count": count, "send": 2000, "reply": 10},
        )  # fmt: skip
        stats = watch.finish(
            lambda ev: ss_count(20601, 2 * count)(ev) and ss_count(20602, 2 * count)(ev)
        )
        events = watch.ss_events()
    for name in ("v4", "v6"):
        assert seen[name] == {"server got True": count, "client got True": count}
    expected = oracle(events, {**listeners, MARKER_PORT: f"127.0.0.1:{MARKER_PORT}"}, [MARKER_PORT])
    got = observed(stats, [MARKER_PORT])
    assert_matches(expected, got)
    # the known byte counts: payload, plus one byte of sequence space for the SYN and the FIN
    v4_out = got.sums[("outbound", "127.0.0.1:20601")]
    sent = sum(1000 + n for n in range(count))
    assert v4_out["bytes_sent"] == sent + 2 * count
    assert got.sums[("inbound", "127.0.0.1:20601")]["bytes_received"] == sent + count
    assert got.closed[("outbound", "[::1]:20602", "ok")] == count
    assert got.closed[("inbound", "[::1]:20602", "ok")] == count
    assert got.sums[("outbound", "[::1]:20602")]["rtt_count"] == count
    assert stats["events"] == len(events) and stats["lost"] == 0 and stats["overruns"] == 0
    assert stats["receive_buffer"] == 2 * DEFAULT_RECEIVE_BUFFER  # root: SO_RCVBUFFORCE


def test_timeouts_refusals_and_aborts_match_ss(netns: Netns) -> None:
    netns.sysctl("net.ipv4.tcp_syn_retries", 1)  # SYN + 1 retry: a timeout in ~3 s
    netns.nft(
        "table inet lifecycle {\n"
        "  chain input { type filter hook input priority 0;\n"
        "    tcp dport 20611 tcp flags syn drop\n  }\n}\n"
    )

    def failing(name: str, host: str, port: int, count: int, blocking: bool) -> dict[str, Any]:
        return {"kind": "failing", "name": name, "host": host, "port": port, "count": count,
                "blocking": blocking}  # fmt: skip

    plan = [
        failing("nb-timeout", "127.0.0.1", 20611, 3, blocking=False),
        failing("b-timeout", "127.0.0.1", 20611, 2, blocking=True),
        failing("nb-refused", "127.0.0.1", 20612, 4, blocking=False),
        failing("b-refused", "127.0.0.1", 20612, 5, blocking=True),
        failing("v6-refused", "::1", 20612, 2, blocking=False),
        {"kind": "linger0", "name": "linger0", "host": "127.0.0.1", "port": 20613, "count": 6},
    ]
    with watching(netns, [20613], [("127.0.0.1", 20613)]) as watch:
        seen = watch.traffic(*plan)
        stats = watch.finish(lambda ev: ss_count(20613, 6)(ev) and ss_count(20611, 3)(ev))
        time.sleep(0.5)
        events = watch.ss_events()
    assert seen["nb-timeout"] == {"ETIMEDOUT": 3}
    assert seen["b-timeout"] == {"ETIMEDOUT": 2}
    assert seen["nb-refused"] == {"ECONNREFUSED": 4}
    assert seen["b-refused"] == {"ECONNREFUSED": 5}
    assert seen["linger0"] == {"reset": 6, "server saw the reset": 6}
    listeners = {20613: "127.0.0.1:20613", MARKER_PORT: f"127.0.0.1:{MARKER_PORT}"}
    expected = oracle(events, listeners, [MARKER_PORT])
    got = observed(stats, [MARKER_PORT])
    assert_matches(expected, got)
    assert got.closed[("outbound", "127.0.0.1:20611", "timeout")] == 3
    assert got.closed[("outbound", "127.0.0.1:20612", "refused")] == 4
    assert got.closed[("outbound", "[::1]:20612", "refused")] == 2
    # blocking failures and SO_LINGER 0: port cleared, counted under the bare address; the
    # failed connects as aborted, the connections that had worked as ok
    assert got.closed[("outbound", "127.0.0.1", "aborted")] == 2 + 5
    assert got.closed[("outbound", "127.0.0.1", "ok")] == 6
    assert got.closed[("inbound", "127.0.0.1:20613", "ok")] == 6  # the server side saw a reset
    # each non-blocking timeout retransmitted its SYN (the kernel turns tcp_syn_retries=1 into
    # a time budget, 2 retransmissions on 6.18); every SYN sent counts as a segment sent
    timeouts = got.sums[("outbound", "127.0.0.1:20611")]
    assert timeouts["segments_retransmitted"] >= 3
    assert timeouts["segments_sent"] == 3 + timeouts["segments_retransmitted"]


def test_induced_loss_retransmissions_equal_the_events_total_retrans(netns: Netns) -> None:
    netns.run("ip", "link", "set", "lo", "mtu", "1500")  # many segments per connection
    netns.nft(
        "table inet lifecycle {\n"
        "  chain input { type filter hook input priority 0;\n"
        "    tcp dport 20621 numgen random mod 100 < 5 drop\n  }\n}\n"
    )
    count = 20
    with watching(netns, [20621], [("127.0.0.1", 20621)]) as watch:
        watch.traffic(
            {"kind": "normal", "name": "lossy", "host": "127.0.0.1", "port": 20621,
             "count": count, "send": 150_000, "reply": 100},
        )  # fmt: skip
        stats = watch.finish(ss_count(20621, 2 * count))
        events = watch.ss_events()
    listeners = {20621: "127.0.0.1:20621", MARKER_PORT: f"127.0.0.1:{MARKER_PORT}"}
    expected = oracle(events, listeners, [MARKER_PORT])
    got = observed(stats, [MARKER_PORT])
    assert_matches(expected, got)
    retransmitted = got.sums[("outbound", "127.0.0.1:20621")]["segments_retransmitted"]
    assert retransmitted == sum(
        e.total_retrans for e in events if e.peer_port == 20621
    )  # the sum of the events' tcpi_total_retrans, as ss printed them
    assert retransmitted > 0


def test_two_namespaces_each_hear_their_own(integration_prerequisites: None) -> None:
    with (
        Netns() as first,
        Netns() as second,
        watching(first, [20631], [("0.0.0.0", 20631)]) as one,
        watching(second, [20631], [("0.0.0.0", 20631)]) as two,
    ):
        for watch, count in ((one, 3), (two, 5)):
            watch.traffic(
                {"kind": "normal", "name": "n", "host": "127.0.0.1", "port": 20631,
                 "bind": "0.0.0.0", "count": count, "send": 10, "reply": 10},
            )  # fmt: skip
        stats_two = two.finish(ss_count(20631, 10))
        events_two = two.ss_events()
        stats_one = one.finish(ss_count(20631, 6))
        events_one = one.ss_events()
    for stats, events, count in ((stats_one, events_one, 3), (stats_two, events_two, 5)):
        listeners = {20631: "0.0.0.0:20631", MARKER_PORT: f"127.0.0.1:{MARKER_PORT}"}
        got = observed(stats, [MARKER_PORT])
        assert_matches(oracle(events, listeners, [MARKER_PORT]), got)
        assert got.closed == Counter(
            {
                ("inbound", "0.0.0.0:20631", "ok"): count,  # named as the wildcard listener
                ("outbound", "127.0.0.1:20631", "ok"): count,
            }
        )


@pytest.mark.parametrize("capabilities", ["unit", "none"])
def test_unprivileged_reader_receives_events(netns: Netns, capabilities: str) -> None:
    caps = unit_capabilities() if capabilities == "unit" else ()
    library = Path(tempfile.mkdtemp(prefix="tw-lifecycle-lib-"))
    try:
        shutil.copytree(REPO_ROOT / "tcpwatch", library / "tcpwatch")
        for path in [library, *library.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())  # host-wide
        wanted = 2 * rmem_max  # more than SO_RCVBUF may grant without CAP_NET_ADMIN
        with watching(
            netns,
            [20641],
            [("127.0.0.1", 20641)],
            options={"receive_buffer": wanted},
            prefix=as_nobody(caps),
            python=SYSTEM_PYTHON,
            pythonpath=str(library),
        ) as watch:
            watch.traffic(
                {"kind": "normal", "name": "n", "host": "127.0.0.1", "port": 20641,
                 "count": 7, "send": 10, "reply": 10},
            )  # fmt: skip
            stats = watch.finish(ss_count(20641, 14))
            events = watch.ss_events()
    finally:
        shutil.rmtree(library, ignore_errors=True)
    got = observed(stats, [MARKER_PORT])
    assert_matches(oracle(events, {20641: "127.0.0.1:20641"}, [MARKER_PORT]), got)
    assert got.closed[("outbound", "127.0.0.1:20641", "ok")] == 7
    # without CAP_NET_ADMIN, SO_RCVBUFFORCE is refused: SO_RCVBUF, capped at rmem_max, doubled
    assert stats["receive_buffer"] == 2 * rmem_max


def test_tiny_buffer_counts_lost_events_and_the_rest_stay_right(netns: Netns) -> None:
    count = 150
    with watching(netns, [20651], [("127.0.0.1", 20651)], options={"receive_buffer": 1}) as watch:
        watch.pause()
        watch.traffic(
            {"kind": "normal", "name": "burst", "host": "127.0.0.1", "port": 20651,
             "count": count, "send": 10, "reply": 10},
        )  # fmt: skip
        stats = watch.finish(ss_count(20651, 2 * count))
        events = watch.ss_events()
    assert len(events) >= 2 * count
    assert stats["overruns"] >= 1
    assert stats["lost"] > 0
    # exact: every event the kernel sent was either counted or is in the drop counter
    assert stats["events"] + stats["lost"] == len(events)
    got = observed(stats)
    expected = oracle(events, {20651: "127.0.0.1:20651", MARKER_PORT: f"127.0.0.1:{MARKER_PORT}"})
    counted = sum(got.closed.values())
    assert counted == stats["events"] - stats["ignored"] > 0
    for key, value in got.closed.items():
        assert value <= expected.closed[key], key  # nothing invented, nothing misfiled
    for key, sums in got.sums.items():
        for name, value in sums.items():
            assert value <= expected.sums[key][name], (key, name)


def test_reader_survives_without_a_context(netns: Netns) -> None:
    """Before the first poll: no listener ports, the default range; nothing is lost or wrong."""
    with watching(netns) as watch:
        watch.traffic(
            {"kind": "normal", "name": "n", "host": "127.0.0.1", "port": 20661,
             "count": 3, "send": 10, "reply": 10},
        )  # fmt: skip
        stats = watch.finish(ss_count(20661, 6))
        events = watch.ss_events()
    got = observed(stats, [MARKER_PORT])
    # the listener's port is outside the ephemeral range: inbound, named by the local address
    assert_matches(oracle(events, {}, [MARKER_PORT]), got)
    assert got.closed[("inbound", "127.0.0.1:20661", "ok")] == 3


def test_live_connections_rtt_and_retransmissions_match_ss(netns: Netns) -> None:
    """The per-destination scan's tcp_info: idle connections, so ss and the poll see the same."""
    populations.established(netns, pairs=30, port=20671)
    populations.established(netns, pairs=5, port=20672, address="::1")
    time.sleep(0.5)  # let delayed ACKs go out: the counters stop moving
    (snapshot,) = poll(CollectSettings(process_attribution=False), (netns.name,))
    events = [e for e in parse_ss_events(netns.ss("-tinH")) if e.state == "ESTAB"]
    assert snapshot.sockets is not None and snapshot.sockets.established_method == "derived"
    uses = {(use.address, use.port): use for use in snapshot.sockets.ephemeral_use}
    for address, port, pairs in (("127.0.0.1", 20671, 30), ("::1", 20672, 5)):
        outbound = [e for e in events if e.peer_port == port and e.peer_address == address]
        assert len(outbound) == pairs
        use = uses[(address, port)]
        assert (use.established, use.sockets) == (pairs, pairs)
        rtts = [e.rtt_us for e in outbound if e.rtt_us]
        assert use.rtt_connections == len(rtts) > 0
        assert use.rtt_max_seconds == pytest.approx(max(rtts) / 1e6, abs=1e-6)
        assert use.rtt_mean_seconds == pytest.approx(sum(rtts) / len(rtts) / 1e6, abs=1e-6)
        assert use.segments_sent == sum(e.number("segs_out") for e in outbound)
        assert use.segments_retransmitted == sum(e.total_retrans for e in outbound)
        assert use.retransmits_in_flight == 0
