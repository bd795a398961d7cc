"""Who is slow, against the real kernel and real programs, with ``ss -tinm`` as the oracle.

* Slow receivers: Debian's nginx serves a large file to four ``curl --limit-rate 20k`` clients;
  nginx's sends stall on their zero windows. ``tcpwatch check`` must name nginx's listener (W01)
  and curl as the application that does not read its data (W02); with the clients then stopped,
  the live figures must equal what ``ss -tinm`` prints for the same sockets.
* A server that stops reading: its receive queue fills (W02 names it), and a second connection
  whose buffer is cut under data in flight makes the kernel drop (TCPRcvQDrop): critical. The
  window and drop counters tcpwatch exports equal ``nstat``.
* A sender with a tiny SO_SNDBUF and a bulk sender, over a veth pair between two namespaces with
  a rate-limited link and an nftables rule dropping 5 % of the bulk sender's packets: W03 names
  the first (send-buffer limited), W04 the second (network limited), and never the other way.
* Spurious retransmissions: the same pair, the sender's link duplicating 5 % of its packets
  (nftables ``dup`` on the egress hook) and the receiver dropping 5 %: the peer reports the
  duplicates (D-SACK), and the retransmissions W04 does not count as loss are each connection's
  ``dsack_dups`` up to its retransmissions, as ``ss -ti`` prints them.

Each test runs for seconds; nginx closes a client that accepts nothing for 60 s, far beyond.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .netns import Netns, run_tcpwatch
from .test_lifecycle_netns import SsEvent
from .test_lifecycle_serve import SsWatch, settled, wait_for_lifecycle
from .test_peer_budget import serving
from .test_serve import Samples, matching, value

pytestmark = pytest.mark.integration

NGINX_PORT = 18080
QUIET_PORT = 19100  # the server that stops reading
DROP_PORT = 19101  # the connection whose buffer is cut under data in flight

_NGINX = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
"""


# --- ss -tinm, parsed -------------------------------------------------------------------------

_SKMEM = re.compile(r"skmem:\(([^)]*)\)")


def ss_connections(ns: Netns, *filters: str) -> list[dict[str, Any]]:
    """``ss -tinmoH state established FILTER``: one dict per connection with the fields the
    live scans read (queues, skmem, persist timer, busy/limited ms, snd_wnd)."""
    text = ns.ss("-tinmoH", "state", "established", *filters)
    connections: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            words = line.split()
            connections.append(
                {
                    "recv_q": int(words[0]),
                    "send_q": int(words[1]),
                    "local": words[2],
                    "remote": words[3],
                    "persist": "timer:(persist" in line,
                }
            )
            continue
        current = connections[-1]
        skmem = _SKMEM.search(line)
        if skmem:
            fields = dict(re.findall(r"([a-z]+)(\d+)", skmem.group(1)))
            current.update({f"skmem_{k}": int(v) for k, v in fields.items()})
        for name in ("busy", "rwnd_limited", "sndbuf_limited"):
            found = re.search(rf"\b{name}:(\d+)ms", line)
            current[name] = int(found.group(1)) if found else 0
        window = re.search(r"\bsnd_wnd:(\d+)", line)
        current["snd_wnd"] = int(window.group(1)) if window else 0
        retransmitted = re.search(r"\bretrans:\d+/(\d+)", line)
        current["retrans_total"] = int(retransmitted.group(1)) if retransmitted else 0
        duplicates = re.search(r"\bdsack_dups:(\d+)", line)
        current["dsack_dups"] = int(duplicates.group(1)) if duplicates else 0
    return connections


def exposition(ns: Netns) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One ``tcpwatch metrics`` poll: (name, sorted labels) -> value."""
    result = run_tcpwatch(ns, "metrics")
    assert result.returncode == 0, result.stderr
    values = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def live(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    netns: str,
    direction: str,
    peer: str,
) -> float:
    labels = (("direction", direction), ("netns", netns), ("peer", peer))
    return values[(f"tcpwatch_live_{name}", labels)]


def check(ns: Netns, *args: str, config: Path | None = None) -> dict[str, Any]:
    extra = ["--config", str(config)] if config is not None else []
    result = run_tcpwatch(ns, "check", "--format", "json", *extra, *args, timeout=90)
    assert "Traceback" not in result.stderr, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert not [s for s in report["sources"] if not s["ok"]], report["sources"]
    return report


def findings(report: dict[str, Any], rule_id: str) -> dict[str, dict[str, Any]]:
    return {f["subject"]: f for f in report["findings"] if f["id"] == rule_id}


def wait_for(what: str, condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {seconds:g} s waiting for {what}")
        time.sleep(0.2)


def owners_of(ns: Netns, port: int, name: str) -> list[int]:
    """Pids of the ``name`` processes holding connections to ``port`` (``ss -tnp``)."""
    text = ns.ss("-tnpH", "state", "established", f"( dport = :{port} )")
    return sorted({int(pid) for pid in re.findall(rf'\("{name}",pid=(\d+)', text)})


# --- slow receivers: nginx and curl --limit-rate -----------------------------------------------


@pytest.fixture
def nginx_with_slow_clients(netns: Netns, tmp_path: Path) -> Iterator[Netns]:
    # nginx's workers run as nobody: the file they serve lives in a directory nobody may read
    # (pytest's tmp_path is root's alone); nginx's own files stay in tmp_path.
    www = Path(tempfile.mkdtemp(prefix="tw-slow-www-"))
    try:
        www.chmod(0o755)
        with open(www / "big.bin", "wb") as big:
            big.truncate(64 << 20)  # sparse: 64 MiB of zeros, written in no time
        (www / "big.bin").chmod(0o644)
        yield from _serve_slowly(netns, tmp_path, www)
    finally:
        shutil.rmtree(www)


def _serve_slowly(netns: Netns, tmp_path: Path, www: Path) -> Iterator[Netns]:
    config = tmp_path / "nginx.conf"
    config.write_text(_NGINX.format(dir=tmp_path, port=NGINX_PORT, www=www))
    netns.spawn(["nginx", "-c", str(config)], lifetime=120)
    wait_for(
        "nginx to listen",
        lambda: "LISTEN" in netns.ss("-Hltn", f"( sport = :{NGINX_PORT} )"),
    )
    url = f"http://127.0.0.1:{NGINX_PORT}/big.bin"
    for _ in range(4):
        netns.spawn(["curl", "-s", "--limit-rate", "20k", "-o", "/dev/null", url], lifetime=120)

    def stalled() -> bool:
        server = ss_connections(netns, f"( sport = :{NGINX_PORT} )")
        return len(server) == 4 and all(c["busy"] >= 500 for c in server)

    wait_for("nginx's four connections to be busy for half a second each", stalled)
    yield netns


def test_nginx_waits_on_slow_curl_clients_and_curl_does_not_read(
    nginx_with_slow_clients: Netns,
) -> None:
    ns = nginx_with_slow_clients
    listener = f"127.0.0.1:{NGINX_PORT}"
    report = check(ns, "--window", "0")
    (slow,) = findings(report, "W01").values()
    assert slow["subject"] == listener and slow["severity"] == "info"
    evidence = slow["evidence"]
    assert (evidence["listener"], evidence["direction"], evidence["process"]) == (
        listener,
        "inbound",
        "nginx",
    )
    assert evidence["connections"] == 4
    assert evidence["rwnd_limited_share"] >= 0.9, evidence  # ss prints 99-100 % here
    assert evidence["worst_peers"].count("127.0.0.1:") >= 1
    not_reading = findings(report, "W02")
    assert set(not_reading) == {listener}  # the destination is the same address:port
    (curl,) = not_reading.values()
    assert (curl["evidence"]["direction"], curl["evidence"]["process"]) == ("outbound", "curl")
    assert curl["evidence"]["receive_full_connections"] >= 1


def test_live_figures_equal_ss_for_stopped_clients(nginx_with_slow_clients: Netns) -> None:
    ns = nginx_with_slow_clients
    curls = owners_of(ns, NGINX_PORT, "curl")
    assert len(curls) == 4, curls
    for pid in curls:  # ours: started by the fixture, found by their connections
        os.kill(pid, signal.SIGSTOP)
    server_filter, client_filter = f"( sport = :{NGINX_PORT} )", f"( dport = :{NGINX_PORT} )"

    def frozen() -> bool:
        first = [(c["send_q"], c["persist"]) for c in ss_connections(ns, server_filter)]
        time.sleep(0.3)
        again = [(c["send_q"], c["persist"]) for c in ss_connections(ns, server_filter)]
        return first == again and all(persist for _, persist in first)

    wait_for("the stopped clients' windows to close and stay closed", frozen)
    before = ss_connections(ns, server_filter), ss_connections(ns, client_filter)
    values = exposition(ns)
    after = ss_connections(ns, server_filter), ss_connections(ns, client_filter)
    netns, peer = ns.name, f"127.0.0.1:{NGINX_PORT}"

    def server(name: str) -> float:
        return live(values, name, netns, "inbound", peer)

    def client(name: str) -> float:
        return live(values, name, netns, "outbound", peer)

    for side in (0, 1):  # nothing moves but the chronographs
        static = [
            (c["recv_q"], c["send_q"], c["skmem_r"], c["skmem_tb"], c["persist"])
            for c in before[side]
        ]
        assert static == [
            (c["recv_q"], c["send_q"], c["skmem_r"], c["skmem_tb"], c["persist"])
            for c in after[side]
        ]
    servers, clients = before
    assert server("connections") == client("connections") == 4
    assert server("send_queue_bytes") == sum(c["send_q"] for c in servers)
    assert server("zero_window_connections") == sum(c["persist"] for c in servers) == 4
    assert client("receive_queue_bytes") == sum(c["recv_q"] for c in clients)
    full = sum(1 for c in clients if c["recv_q"] and 2 * c["skmem_r"] >= c["skmem_rb"])
    assert client("receive_full_connections") == full == 4
    assert (
        sum(c["skmem_d"] for c in clients)
        <= client("socket_drops")
        <= sum(c["skmem_d"] for c in after[1])
    )
    for name in ("busy", "rwnd_limited"):
        # ss prints whole milliseconds, truncated; tcp_info has microseconds.
        low = sum(c[name] for c in servers) / 1000
        high = sum(c[name] + 1 for c in after[0]) / 1000
        assert low <= server(f"{name}_seconds") <= high, (name, low, high)
    assert values[("tcpwatch_inbound_scan_complete", (("netns", netns),))] == 1


def test_closed_connections_keep_where_their_time_went(
    nginx_with_slow_clients: Netns, tmp_path: Path
) -> None:
    """Item 1 for connections that closed: the stopped clients are killed (their sockets reset
    nginx's), and the listener's row of the connection metrics adds each connection's
    chronographs at close: what ``ss -tinE`` beside it prints for the same destroy events, and
    at least what ``ss -ti`` showed just before; every one ended on the clients' zero window.

    The oracle is the destroy event, not the time of the reset: the kernel leaves the
    receiver-limited chronograph of a reset connection with unsent data running
    (tcp_write_queue_purge stops the busy one before it empties the queues) and fills tcp_info
    when the event is sent, after nginx closed the socket and the kernel's workqueue ran: seconds
    later on a loaded machine."""
    ns = nginx_with_slow_clients
    server_filter = f"( sport = :{NGINX_PORT} )"
    listener = f"127.0.0.1:{NGINX_PORT}"
    watch = SsWatch(ns, tmp_path)
    watch.sync()
    with serving(ns, tmp_path, 19483) as served:
        wait_for_lifecycle(served, ns.name)
        curls = owners_of(ns, NGINX_PORT, "curl")
        assert len(curls) == 4, curls
        for pid in curls:
            os.kill(pid, signal.SIGSTOP)
        # The persist timer starts as soon as the window is too small to send into (a few
        # bytes left, not yet 0): wait until every window is shut, which a stopped reader's
        # filling buffer comes to.
        wait_for(
            "the stopped clients' windows to close",
            lambda: all(
                c["persist"] and c["snd_wnd"] == 0 for c in ss_connections(ns, server_filter)
            ),
            60.0,
        )
        before = ss_connections(ns, server_filter)
        assert len(before) == 4 and all(c["snd_wnd"] == 0 for c in before), before
        for pid in curls:  # unread data: each curl socket resets, and nginx closes its own
            os.kill(pid, signal.SIGKILL)
        events = watch.wait(
            lambda found: len(nginx_events(found)) == 4, "nginx's four connections destroyed"
        )
        # ss heard the events; tcpwatch counts them at a poll after its reader has (bounded)
        samples = settled(served)
        deadline = time.monotonic() + 30
        while closed_count(samples, ns.name, listener) != (4, 4):
            assert time.monotonic() < deadline, (closed_count(samples, ns.name, listener),
                                                 served.log())  # fmt: skip
            samples = settled(served)
    row = {"netns": ns.name, "direction": "inbound", "peer": listener}

    def closed(name: str) -> float:
        found = value(samples, f"tcpwatch_connection_{name}_total", **row)
        assert found is not None, (name, served.log())
        return found

    destroyed = nginx_events(events)
    for name in ("busy", "rwnd_limited"):
        # ss prints whole milliseconds, truncated (busy:6380ms, rwnd_limited:6380ms(100.0%))
        printed = [int(e.info.get(name, "0ms").partition("ms")[0]) for e in destroyed]
        low, high = sum(printed) / 1000, sum(ms + 1 for ms in printed) / 1000
        assert low <= closed(f"{name}_seconds") <= high, (name, low, high)
        # the chronographs only grew since ss -ti read the live sockets
        assert sum(c[name] for c in before) <= sum(printed), (name, before, printed)
    assert closed("rwnd_limited_seconds") >= 0.9 * closed("busy_seconds")
    assert not [e for e in destroyed if "snd_wnd" in e.info]  # ss prints a window only if > 0
    assert closed("zero_window_closes") == 4
    outbound = {"netns": ns.name, "direction": "outbound", "peer": listener}
    assert value(samples, "tcpwatch_connection_zero_window_closes_total", **outbound) == 0


def nginx_events(events: list[SsEvent]) -> list[SsEvent]:
    """The destroy events of nginx's side of its clients' connections."""
    return [e for e in events if e.local_port == NGINX_PORT]


def closed_count(samples: Samples, netns: str, peer: str) -> tuple[float, float]:
    """Connections closed on the (inbound, outbound) rows of ``peer``, every outcome."""

    def row(direction: str) -> float:
        name = "tcpwatch_connections_closed_total"
        return sum(matching(samples, name, netns=netns, direction=direction, peer=peer).values())

    return row("inbound"), row("outbound")


# --- a server that stops reading -------------------------------------------------------------

_QUIET_SERVER = r"""
import ctypes, socket, sys, threading, time
ctypes.CDLL(None).prctl(15, b"quietserver", 0, 0, 0)  # PR_SET_NAME
quiet_port, drop_port = int(sys.argv[1]), int(sys.argv[2])

def listen(port):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(8)
    return server

def pour(port):  # a client that sends as long as it may
    client = socket.create_connection(("127.0.0.1", port))
    client.settimeout(40)
    try:
        while True:
            client.sendall(b"x" * 65536)
    except OSError:
        pass

quiet, dropping = listen(quiet_port), listen(drop_port)
for port in (quiet_port, drop_port):
    threading.Thread(target=pour, args=(port,), daemon=True).start()
never_read, _ = quiet.accept()  # its queue fills, and stays full
cut, _ = dropping.accept()
print("ready", flush=True)
end = time.monotonic() + 40
while time.monotonic() < end:
    # read fast with room, then cut the buffer under the data in flight: the kernel drops it
    cut.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    stop = time.monotonic() + 0.3
    while time.monotonic() < stop:
        cut.recv(1 << 20)
    cut.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    time.sleep(0.3)
"""

# Counters tcpwatch exports beside the live figures (families/counters.py SLOWNESS_COUNTERS).
SLOWNESS = {
    "TcpExtTCPWinProbe": "tcpwatch_tcp_window_probes_sent_total",
    "TcpExtTCPToZeroWindowAdv": "tcpwatch_tcp_to_zero_window_advertised_total",
    "TcpExtTCPFromZeroWindowAdv": "tcpwatch_tcp_from_zero_window_advertised_total",
    "TcpExtTCPWantZeroWindowAdv": "tcpwatch_tcp_want_zero_window_advertised_total",
    "TcpExtTCPZeroWindowDrop": "tcpwatch_tcp_zero_window_drops_total",
    "TcpExtTCPRcvQDrop": "tcpwatch_tcp_receive_queue_drops_total",
    "TcpExtTCPBacklogDrop": "tcpwatch_tcp_backlog_drops_total",
    "TcpExtTCPOFODrop": "tcpwatch_tcp_out_of_order_drops_total",
    "TcpExtRcvPruned": "tcpwatch_tcp_receive_pruned_total",
    "TcpExtTCPLossProbes": "tcpwatch_tcp_loss_probes_total",
    "TcpExtTCPSpuriousRTOs": "tcpwatch_tcp_spurious_rtos_total",
}


def test_a_server_that_stops_reading_is_named_and_its_drops_are_critical(netns: Netns) -> None:
    ns = netns
    server = ns.spawn(
        [sys.executable, "-c", _QUIET_SERVER, str(QUIET_PORT), str(DROP_PORT)], lifetime=60
    )
    assert ns.read_line(server, timeout=20) == "ready", ns.stderr_of(server)
    quiet_filter = f"( sport = :{QUIET_PORT} )"

    def full() -> bool:
        first = ss_connections(ns, quiet_filter)
        time.sleep(0.3)
        again = ss_connections(ns, quiet_filter)
        return first == again and all(c["recv_q"] and 2 * c["skmem_r"] >= c["skmem_rb"]
                                      for c in again)  # fmt: skip

    wait_for("the quiet server's receive queue to fill, and stay so", full)
    drops_before = ns.nstat()["TcpExtTCPRcvQDrop"]
    quiet_before = ss_connections(ns, quiet_filter)
    report = check(ns, "--window", "3")
    drops = ns.nstat()["TcpExtTCPRcvQDrop"] - drops_before
    quiet = findings(report, "W02")[f"127.0.0.1:{QUIET_PORT}"]
    assert quiet["severity"] == "critical", quiet
    evidence = quiet["evidence"]
    assert (evidence["process"], evidence["direction"]) == ("quietserver", "inbound")
    assert evidence["receive_full_connections"] == 1
    (held,) = quiet_before
    assert evidence["receive_queue_max_bytes"] == held["recv_q"]  # nothing reads it: static
    assert 1 <= evidence["tcp_rcv_q_drop_in_window"] <= drops, (evidence, drops)
    # The namespace's window and drop counters, exact: between two nstat reads around a poll.
    low = ns.nstat()
    values = exposition(ns)
    high = ns.nstat()
    for nstat_name, metric in SLOWNESS.items():
        value = values[(metric, (("netns", ns.name),))]
        assert low[nstat_name] <= value <= high[nstat_name], (nstat_name, low, value, high)
    assert high["TcpExtTCPRcvQDrop"] >= 1 and high["TcpExtTCPToZeroWindowAdv"] >= 1


# --- a tiny send buffer and a lossy link, told apart -----------------------------------------

_PUMP = r"""
import ctypes, socket, sys, time
name, address, port, sndbuf = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
client = socket.socket()
# cubic: its window grows without loss, so a small buffer, not the window, holds it back
# (root may pick any congestion control for its own socket)
client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
if sndbuf:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
client.connect((address, port))
print("connected", flush=True)
data = b"y" * 65536
end = time.monotonic() + 40
while time.monotonic() < end:
    client.sendall(data)
"""

_SINK = r"""
import socket, sys, threading
def serve(server):
    while True:
        connection, _ = server.accept()
        threading.Thread(target=drain, args=(connection,), daemon=True).start()
def drain(connection):
    while connection.recv(1 << 20):
        pass
for port in (5001, 5002, 5003):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((sys.argv[1], port))
    server.listen(8)
    threading.Thread(target=serve, args=(server,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait(60)
"""


@pytest.fixture
def two_namespaces(integration_prerequisites: None) -> Iterator[tuple[Netns, Netns]]:
    with Netns() as sender, Netns() as receiver:
        yield sender, receiver


def test_a_tiny_send_buffer_and_a_lossy_link_are_told_apart(
    two_namespaces: tuple[Netns, Netns], tmp_path: Path
) -> None:
    sender, receiver = two_namespaces
    subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
    near, far = f"{subnet}.1", f"{subnet}.2"
    # The veth pair is made straight inside the two namespaces: the host gets no interface.
    subprocess.run(
        ["ip", "link", "add", "twslow0", "netns", sender.name, "type", "veth",
         "peer", "name", "twslow1", "netns", receiver.name],
        check=True, timeout=30,
    )  # fmt: skip
    sender.run("ip", "addr", "add", f"{near}/24", "dev", "twslow0")
    receiver.run("ip", "addr", "add", f"{far}/24", "dev", "twslow1")
    sender.run("ip", "link", "set", "twslow0", "up")
    receiver.run("ip", "link", "set", "twslow1", "up")
    # A 20 Mbit/s link with a queue (a bulk flow fills it: a few ms of RTT), segments of one
    # MSS (no GSO: a send buffer is then what SO_SNDBUF says, not one 64 KiB super-segment).
    sender.run("tc", "qdisc", "add", "dev", "twslow0", "root", "tbf", "rate", "20mbit",
               "burst", "32kbit", "latency", "100ms")  # fmt: skip
    sender.run("ip", "link", "set", "twslow0", "gso_max_segs", "1")
    receiver.nft(
        "table inet tw_loss {\n"
        "  chain input { type filter hook input priority 0; "
        "tcp dport 5002 numgen random mod 100 < 5 drop; }\n"
        "}\n"
    )
    sink = receiver.spawn([sys.executable, "-c", _SINK, far], lifetime=60)
    assert receiver.read_line(sink, timeout=20) == "ready", receiver.stderr_of(sink)
    for name, port, sndbuf in (("filler", 5003, 0), ("tinysndbuf", 5001, 4096),
                               ("bulksender", 5002, 0)):  # fmt: skip
        pump = sender.spawn([sys.executable, "-c", _PUMP, name, far, str(port), str(sndbuf)],
                            lifetime=60)  # fmt: skip
        assert sender.read_line(pump, timeout=20) == "connected", sender.stderr_of(pump)

    def busy_enough() -> bool:
        found = ss_connections(sender, f"( dst {far} )")
        return len(found) == 3 and all(c["busy"] >= 2500 for c in found)

    wait_for("each sender to be busy for 2.5 s", busy_enough, seconds=30)
    # The kernel counts only part of a tiny buffer's waits as send-buffer limited (slow start
    # calls a connection with fewer than twice its packets in flight window-limited): 35-45 %
    # of busy time here. The rule is told 10 % so the test does not hang on that share.
    config = tmp_path / "tcpwatch.yaml"
    config.write_text("rules:\n  W03:\n    warning: 0.1\n")
    before = {c["remote"]: c for c in ss_connections(sender, f"( dst {far} )")}
    report = check(sender, "--window", "0", config=config)
    after = {c["remote"]: c for c in ss_connections(sender, f"( dst {far} )")}
    tiny, bulk = f"{far}:5001", f"{far}:5002"
    buffer_bound, network_bound = findings(report, "W03"), findings(report, "W04")
    assert tiny in buffer_bound and bulk not in buffer_bound, list(buffer_bound)
    assert bulk in network_bound and tiny not in network_bound, list(network_bound)
    w03 = buffer_bound[tiny]["evidence"]
    assert w03["process"] == "tinysndbuf"
    assert w03["send_buffer_bytes"] == before[tiny]["skmem_tb"] == 8192  # SO_SNDBUF 4096, doubled
    low = before[tiny]["sndbuf_limited"] / 1000
    high = (after[tiny]["sndbuf_limited"] + 1) / 1000
    assert low <= w03["sndbuf_limited_seconds"] <= high, (w03, low, high)
    assert "sets SO_SNDBUF itself" in buffer_bound[tiny]["remediation"]
    w04 = network_bound[bulk]["evidence"]
    assert w04["process"] == "bulksender"
    assert w04["retransmission_ratio"] >= 0.02
    assert w04.get("sndbuf_limited_share", 0) < 0.5 and w04.get("rwnd_limited_share", 0) < 0.5


# One poll in the namespace: the live connections to one destination as the scan summed them.
_DESTINATION_STALLS = r"""
import json, sys
from tcpwatch.config import Config
from tcpwatch.pipeline import Pipeline

pipeline = Pipeline(long_lived=False, cached=False, log_failures=False)
try:
    state = pipeline.poll(Config(check_window=0.0))
finally:
    pipeline.close()
(snapshot,) = state.snapshots
found = [
    use.stalls for use in snapshot.sockets.ephemeral_use
    if (use.address, use.port) == (sys.argv[1], int(sys.argv[2])) and use.stalls is not None
]
print(json.dumps([[s.connections, s.segments_retransmitted, s.segments_spurious] for s in found]))
"""


def test_spurious_retransmissions_are_the_duplicates_the_peer_reported_up_to_the_resent(
    two_namespaces: tuple[Netns, Netns],
) -> None:
    """tcpi_dsack_dups counts every duplicate the peer reports (D-SACK), also those the link
    made of a segment sent once; the live scan takes each connection's at most its own
    tcpi_total_retrans. Compared with ``ss -ti`` (``retrans:N/TOTAL``, ``dsack_dups:N``) read
    just before and just after the poll: the counts only grow, so the poll's lie between."""
    sender, receiver = two_namespaces
    subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
    near, far = f"{subnet}.1", f"{subnet}.2"
    subprocess.run(
        ["ip", "link", "add", "twdup0", "netns", sender.name, "type", "veth",
         "peer", "name", "twdup1", "netns", receiver.name],
        check=True, timeout=30,
    )  # fmt: skip
    sender.run("ip", "addr", "add", f"{near}/24", "dev", "twdup0")
    receiver.run("ip", "addr", "add", f"{far}/24", "dev", "twdup1")
    sender.run("ip", "link", "set", "twdup0", "up")
    receiver.run("ip", "link", "set", "twdup1", "up")
    sender.nft(
        "table netdev tw_dup {\n"
        '  chain out { type filter hook egress device "twdup0" priority 0; '
        'tcp dport 5002 numgen random mod 100 < 5 dup to "twdup0"; }\n'
        "}\n"
    )
    receiver.nft(
        "table inet tw_loss {\n"
        "  chain input { type filter hook input priority 0; "
        "tcp dport 5002 numgen random mod 100 < 5 drop; }\n"
        "}\n"
    )
    sink = receiver.spawn([sys.executable, "-c", _SINK, far], lifetime=60)
    assert receiver.read_line(sink, timeout=20) == "ready", receiver.stderr_of(sink)
    pump = sender.spawn([sys.executable, "-c", _PUMP, "dupsender", far, "5002", "0"], lifetime=60)
    assert sender.read_line(pump, timeout=20) == "connected", sender.stderr_of(pump)

    def reported() -> bool:
        found = ss_connections(sender, f"( dst {far}:5002 )")
        return len(found) == 1 and min(found[0]["dsack_dups"], found[0]["retrans_total"]) >= 50

    wait_for("the peer to report duplicates and the sender to retransmit", reported, seconds=30)
    (before,) = ss_connections(sender, f"( dst {far}:5002 )")
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    polled = sender.run(sys.executable, "-c", _DESTINATION_STALLS, far, "5002", env=environment,
                        timeout=60)  # fmt: skip
    (after,) = ss_connections(sender, f"( dst {far}:5002 )")
    ((connections, retransmitted, spurious),) = json.loads(polled.stdout)
    assert connections == 1
    assert before["retrans_total"] <= retransmitted <= after["retrans_total"], (
        before, retransmitted, after,
    )  # fmt: skip
    low = min(before["dsack_dups"], before["retrans_total"])
    high = min(after["dsack_dups"], after["retrans_total"])
    assert 50 <= low <= spurious <= high, (before, spurious, after)


# --- the views: tcpwatch top and the live page -------------------------------------------------

READ_SLOW_PEERS = """[...document.querySelectorAll("#slow-peers tbody tr")].map(
  (row) => [...row.querySelectorAll("td")].map((cell) => cell.textContent))"""


def test_top_and_the_live_page_show_the_slowest_peers(
    nginx_with_slow_clients: Netns, tmp_path: Path
) -> None:
    from .browser import Browser
    from .test_serve import start_serve

    ns = nginx_with_slow_clients
    listener = f"127.0.0.1:{NGINX_PORT}"
    assert len(owners_of(ns, NGINX_PORT, "curl")) == 4  # the four clients are there
    screen = run_tcpwatch(ns, "top")  # not a terminal: one screen, polling the host itself
    assert screen.returncode == 0, screen.stderr
    lines = screen.stdout.splitlines()
    start = lines.index("WHO IS SLOW: peers by time waiting (live connections)")
    rows = [line.split() for line in lines[start + 2 : start + 4]]
    first = next(row for row in rows if row[:3] == ["clients", "of", listener])
    assert first[3].startswith("nginx[") and first[4] == "receiver", rows
    assert any(row[:2] == ["to", listener] and row[2].startswith("curl[") for row in rows), rows

    served = start_serve(ns, tmp_path / "serve.log", "--web.listen-address", "127.0.0.1:19477",
                         "--interval", "2s")  # fmt: skip
    served.port = 19477
    try:
        served.wait_ready()
        with Browser(ns.exec_argv) as browser:
            browser.open(f"http://127.0.0.1:{served.port}/")
            browser.wait_for("document.querySelectorAll('#slow-peers tbody tr').length >= 2")
            shown = browser.evaluate(READ_SLOW_PEERS)
    finally:
        served.process.kill()
        served.process.wait(timeout=30)
    by_peer = {row[0]: row for row in shown}
    inbound = by_peer[f"clients of {listener}"]
    assert inbound[1].startswith("nginx[") and inbound[2] == "receiver", shown
    assert inbound[3] == "4" and inbound[4].endswith("%")
    outbound = by_peer[f"to {listener}"]
    assert outbound[1].startswith("curl[") and outbound[2] == "application", shown
