"""How much RTT histogram buckets cost in accuracy: real RTTs at close, several bucket layouts.

Run as root from the repository root::

    python benchmarks/bench_rtt_buckets.py [--connections 400] [--samples-out FILE]
    python benchmarks/bench_rtt_buckets.py --samples-in FILE      # analyse recorded samples

For each scenario, in throw-away network namespaces (``ip netns add``), a client calls a server
(request of 100 bytes, response of ``--response`` bytes, the server closes first) and a recorder
in the client's namespace reads the kernel's socket-destroy events (tcpwatch's own reader) and
keeps the smoothed RTT at close (``tcpi_rtt``) of every outbound connection: the value
``tcpwatch_connection_rtt_seconds`` observes. Scenarios:

* ``loopback``: one namespace, 127.0.0.1; ``veth``: two namespaces over a veth pair;
* ``path-*``: two namespaces joined by a userspace delay line (a TUN device in each, one
  process forwarding between them with a one-way delay of RTT/2 plus an exponential jitter of
  mean 5% of it, first in first out per direction, as a real path keeps order). This kernel has
  no ``sch_netem``, hence the delay line; its own forwarding adds 50-300 us here;
* ``two-paths``: the delay line with 5 ms for clients on even ports and 40 ms for odd ones (one
  destination behind two zones);
* ``congested``: a veth pair shaped with ``tbf`` (10 Mbit/s, 100 ms of queue) while two bulk
  flows fill it: queueing delay (bufferbloat) on top of the path.

Every address is in 127.0.0.0/8 (``route_localnet`` on the links), inside namespaces this run
made. Then, for every bucket layout, the histogram of each scenario's samples and Prometheus'
``histogram_quantile`` (the same interpolation, reimplemented below) against the exact quantile
of the samples; and whether a doubling of the RTT (``path-20ms`` to ``path-40ms``) moves the
estimate. Prints Markdown. A measurement, not a test. Everything is removed in ``finally``
blocks; children die with the run (PR_SET_PDEATHSIG) or by ``timeout``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from namespace import Namespace

REPO = Path(__file__).resolve().parent.parent
PORT = 20901
QUANTILES = (0.5, 0.9, 0.99)

# The layouts compared: upper bounds in seconds (+Inf implied).
LAYOUTS: dict[str, tuple[float, ...]] = {
    "1-2-5, 100us..1s (before)": (
        0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
    ),
    "x2, 8us..2.1s": tuple(0.000008 * 2**k for k in range(19)),
    "1-2-5, 10us..1s": (*(m * 10.0**e for e in range(-5, 0) for m in (1, 2, 5)), 1.0),
    "1-3, 10us..1s (chosen)": (*(m * 10.0**e for e in range(-5, 0) for m in (1, 3)), 1.0),
    "1-3, 100us..1s": (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    "x4, 25us..1.6s": tuple(0.000025 * 4**k for k in range(9)),
    "decades, 10us..1s": (0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0),
}  # fmt: skip

RECORDER = r"""
import json, select, sys
from tcpwatch.sources.lifecycle import open_destroy_socket
from tcpwatch.sources.lifecycle_events import parse_destroy_messages
port = int(sys.argv[1])
sock = open_destroy_socket(16 << 20)
samples, lost = [], 0
print("ready", flush=True)
while True:
    readable, _, _ = select.select([sock, sys.stdin], [], [], 1.0)
    if sock in readable:
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                lost += 1
                continue
            for event in parse_destroy_messages(data):
                if event.destination_port == port and event.info and event.info.rtt:
                    samples.append(event.info.rtt)
    if sys.stdin in readable and not sys.stdin.readline():
        break
print(json.dumps({"samples": samples, "lost": lost}), flush=True)
"""

SERVER = r"""
import socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = b"x" * size
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(1024)
def serve(conn):
    with conn:
        conn.settimeout(30)
        try:
            conn.recv(4096)
            conn.sendall(payload)
        except OSError:
            pass
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

CLIENT = r"""
import socket, sys, threading
host, port, count, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
done, lock = [0], threading.Lock()
def work(n):
    for _ in range(n):
        try:
            with socket.create_connection((host, port), timeout=30) as sock:
                sock.sendall(b"r" * 100)
                while sock.recv(65536):
                    pass
            with lock:
                done[0] += 1
        except OSError:
            pass
threads = [threading.Thread(target=work, args=(count // workers,)) for _ in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(done[0], flush=True)
"""

# Streams forever to whoever connects (the congested scenario's bulk flows).
BULK_SERVER = r"""
import socket, sys, threading
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(16)
def blast(conn):
    chunk = b"b" * 65536
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        pass
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=blast, args=(conn,), daemon=True).start()
"""

BULK_CLIENT = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
print("ready", flush=True)
while sock.recv(1 << 20):
    pass
"""

# Opens a TUN device named argv[2] in this namespace and one in the namespace named argv[1]
# (setns), then forwards packets between them with a delay: one-way = RTT/2 of the profile,
# plus an exponential jitter (mean 5%), first in first out per direction. A profile is
# "RTT_MS" or "EVEN_MS/ODD_MS" (by the client's port, the source port of packets leaving A).
DELAY_LINE = r"""
import ctypes, fcntl, heapq, os, random, select, struct, sys, time
other, name, profile = sys.argv[1], sys.argv[2], sys.argv[3]
def tun():
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
    return fd
a = tun()
libc = ctypes.CDLL(None, use_errno=True)
target = os.open("/run/netns/" + other, os.O_RDONLY)
if libc.setns(target, 0x40000000) != 0:
    raise SystemExit("setns failed")
b = tun()
rtts = [float(x) / 1000 for x in profile.split("/")]
def one_way(packet, from_a):
    if len(rtts) == 1 or len(packet) < 24:
        rtt = rtts[0]
    else:
        ihl = (packet[0] & 15) * 4
        sport, dport = struct.unpack_from("!HH", packet, ihl)
        rtt = rtts[(sport if from_a else dport) % 2]
    half = rtt / 2
    return half + random.expovariate(1 / (0.05 * half))
queue, seq, last = [], 0, {a: 0.0, b: 0.0}
print("ready", flush=True)
while True:
    timeout = max(queue[0][0] - time.monotonic(), 0) if queue else 1.0
    readable, _, _ = select.select([a, b, sys.stdin], [], [], timeout)
    now = time.monotonic()
    for fd in readable:
        if fd is sys.stdin:
            if not sys.stdin.readline():
                raise SystemExit(0)
            continue
        out = b if fd == a else a
        for _ in range(64):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                break
            at = max(now + one_way(packet, fd == a), last[out])
            last[out] = at
            seq += 1
            heapq.heappush(queue, (at, seq, out, packet))
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, out, packet = heapq.heappop(queue)
        try:
            os.write(out, packet)
        except BlockingIOError:
            heapq.heappush(queue, (now + 0.0001, 0, out, packet))
            break
        except OSError:
            pass
"""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    what: str
    topology: str  # "loopback", "veth", "delay:<profile>", "congested"


SCENARIOS = (
    Scenario("loopback", "one namespace, 127.0.0.1", "loopback"),
    Scenario("veth", "two namespaces over veth", "veth"),
    Scenario("path-0.5ms", "delay line, RTT 0.5 ms", "delay:0.5"),
    Scenario("path-2ms", "delay line, RTT 2 ms", "delay:2"),
    Scenario("path-20ms", "delay line, RTT 20 ms", "delay:20"),
    Scenario("path-40ms", "delay line, RTT 40 ms", "delay:40"),
    Scenario("path-120ms", "delay line, RTT 120 ms", "delay:120"),
    Scenario("two-paths", "delay line, RTT 5 ms or 40 ms by client port", "delay:5/40"),
    Scenario("congested", "veth, tbf 10 Mbit/s, two bulk flows", "congested"),
)


class Run:
    """Children and namespaces of one scenario; all removed on exit."""

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.env = dict(os.environ, PYTHONPATH=str(REPO))

    def namespace(self) -> Namespace:
        namespace = Namespace.create("tw-bench-rtt")
        self.stack.callback(namespace.delete)
        return namespace

    def spawn(self, namespace: Namespace, script: str, *args: str) -> subprocess.Popen[str]:
        child = namespace.spawn(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=str(REPO),
        )
        self.stack.callback(_kill, child)
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{script.splitlines()[1][:40]!r} did not start: {line!r}")
        return child


def _kill(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(timeout=10)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


def _localnet(namespace: Namespace, interface: str) -> None:
    namespace.write_sysctl("net.ipv4.conf.all.route_localnet", "1")
    namespace.write_sysctl(f"net.ipv4.conf.{interface}.route_localnet", "1")


def _veth(client: Namespace, server: Namespace) -> tuple[str, str]:
    _ip("-n", client.name, "link", "add", "twr0", "type", "veth", "peer", "name", "twr1",
        "netns", server.name)  # fmt: skip
    for namespace, interface, address in ((client, "twr0", "127.3.0.1"),
                                          (server, "twr1", "127.3.0.2")):  # fmt: skip
        _localnet(namespace, interface)
        _ip("-n", namespace.name, "addr", "add", f"{address}/24", "dev", interface)
        _ip("-n", namespace.name, "link", "set", interface, "up")
    return "twr0", "twr1"


def _delay_line(run: Run, client: Namespace, server: Namespace, profile: str) -> None:
    run.spawn(client, DELAY_LINE, server.name, "twd0", profile)
    for namespace, local, remote in ((client, "127.3.0.1", "127.3.0.2"),
                                     (server, "127.3.0.2", "127.3.0.1")):  # fmt: skip
        _localnet(namespace, "twd0")
        _ip("-n", namespace.name, "addr", "add", local, "peer", remote, "dev", "twd0")
        _ip("-n", namespace.name, "link", "set", "twd0", "up")


def record(scenario: Scenario, connections: int, response: int) -> list[int]:
    """The smoothed RTTs at close (us) of ``connections`` calls in ``scenario``."""
    with ExitStack() as stack:
        run = Run(stack)
        client = run.namespace()
        host = "127.0.0.1"
        server = client
        if scenario.topology != "loopback":
            server = run.namespace()
            host = "127.3.0.2"
            if scenario.topology.startswith("delay:"):
                _delay_line(run, client, server, scenario.topology.split(":", 1)[1])
            else:
                client_if, server_if = _veth(client, server)
                if scenario.topology == "congested":
                    for namespace, interface in ((client, client_if), (server, server_if)):
                        _ip("-n", namespace.name, "link", "set", interface, "txqueuelen", "1000")
                        subprocess.run(
                            ["ip", "netns", "exec", namespace.name, "tc", "qdisc", "add", "dev",
                             interface, "root", "tbf", "rate", "10mbit", "burst", "16kb",
                             "latency", "100ms"],
                            check=True, capture_output=True, timeout=30,
                        )  # fmt: skip
        recorder = run.spawn(client, RECORDER, str(PORT))
        run.spawn(server, SERVER, host, str(PORT), str(response))
        if scenario.topology == "congested":
            run.spawn(server, BULK_SERVER, host, str(PORT + 1))
            for _ in range(2):
                run.spawn(client, BULK_CLIENT, host, str(PORT + 1))
            time.sleep(3)  # the queue fills
        workers = "8" if scenario.topology.startswith("delay:") else "4"
        result = subprocess.run(
            ["ip", "netns", "exec", client.name, "timeout", "-s", "KILL", "300", sys.executable,
             "-c", CLIENT, host, str(PORT), str(connections), workers],
            capture_output=True, text=True, timeout=320, env=run.env,
        )  # fmt: skip
        done = int(result.stdout.strip() or 0)
        time.sleep(1.0)
        assert recorder.stdin is not None and recorder.stdout is not None
        recorder.stdin.close()
        report = json.loads(recorder.stdout.readline())
        if done < connections * 0.9 or report["lost"]:
            raise RuntimeError(f"{scenario.name}: {done} calls of {connections}, {report}")
        samples: list[int] = report["samples"]
        return samples


# --- analysis ------------------------------------------------------------------------------


def histogram(samples_us: Sequence[int], bounds: Sequence[float]) -> list[int]:
    """Cumulative counts per bound (le), +Inf last: what the exposition carries."""
    seconds = sorted(s / 1e6 for s in samples_us)
    counts = [sum(1 for s in seconds if s <= bound) for bound in bounds]
    return [*counts, len(seconds)]


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[int]) -> float:
    """Prometheus' bucketQuantile (promql/quantile.go, 2.42): linear inside the bucket that
    holds rank q * count, 0 as the first bucket's lower end, the last finite bound for +Inf."""
    total = cumulative[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next(i for i, count in enumerate(cumulative) if count >= rank)
    if b == len(bounds):
        return bounds[-1]
    start, end, count = 0.0, bounds[b], cumulative[b]
    if b > 0:
        start = bounds[b - 1]
        count -= cumulative[b - 1]
        rank -= cumulative[b - 1]
    return start + (end - start) * (rank / count)


def exact_quantile(q: float, samples_us: Sequence[int]) -> float:
    """The nearest-rank quantile of the samples, in seconds."""
    ordered = sorted(samples_us)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)] / 1e6


def relative_error(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / exact


@dataclass(frozen=True, slots=True)
class Row:
    layout: str
    series: int
    errors: dict[float, list[float]]  # quantile -> relative error per scenario
    doubling: float  # estimated p90 ratio path-40ms / path-20ms (exact ratio beside)


def analyse(samples: dict[str, list[int]]) -> list[Row]:
    rows = []
    for layout, bounds in LAYOUTS.items():
        errors: dict[float, list[float]] = {q: [] for q in QUANTILES}
        for values in samples.values():
            cumulative = histogram(values, bounds)
            for q in QUANTILES:
                estimate = histogram_quantile(q, bounds, cumulative)
                errors[q].append(relative_error(estimate, exact_quantile(q, values)))
        doubling = math.nan
        if "path-20ms" in samples and "path-40ms" in samples:
            low, high = (
                histogram_quantile(0.9, bounds, histogram(samples[name], bounds))
                for name in ("path-20ms", "path-40ms")
            )
            doubling = high / low
        rows.append(Row(layout, len(bounds) + 3, errors, doubling))
    return rows


def report(samples: dict[str, list[int]]) -> Iterator[str]:
    yield "| scenario | calls | p50 | p90 | p99 | max/min of the middle 80% |"
    yield "|---|---:|---:|---:|---:|---:|"
    for name, values in samples.items():
        p = [exact_quantile(q, values) * 1e3 for q in QUANTILES]
        spread = exact_quantile(0.9, values) / exact_quantile(0.1, values)
        yield (
            f"| {name} | {len(values)} | {p[0]:.3f} ms | {p[1]:.3f} ms | {p[2]:.3f} ms "
            f"| {spread:.2f} |"
        )
    yield ""
    exact = math.nan
    if "path-20ms" in samples and "path-40ms" in samples:
        exact = exact_quantile(0.9, samples["path-40ms"]) / exact_quantile(
            0.9, samples["path-20ms"]
        )
    yield (
        "| layout | finite buckets | series (buckets+Inf, sum, count) | p50 error median / max "
        f"| p90 error median / max | p99 error median / max | p90 20->40 ms (exact {exact:.2f}) |"
    )
    yield "|---|---:|---:|---|---|---|---:|"
    for row in analyse(samples):
        cells = [
            f"{statistics.median(row.errors[q]):.0%} / {max(row.errors[q]):.0%}" for q in QUANTILES
        ]
        yield (
            f"| {row.layout} | {row.series - 3} | {row.series} | {' | '.join(cells)} "
            f"| {row.doubling:.2f} |"
        )
    yield ""
    yield "p90 error per scenario:"
    yield ""
    names = list(samples)
    yield "| layout | " + " | ".join(names) + " |"
    yield "|---|" + "---:|" * len(names)
    for row in analyse(samples):
        yield f"| {row.layout} | " + " | ".join(f"{e:.0%}" for e in row.errors[0.9]) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--response", type=int, default=20000, help="bytes per response")
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--samples-out", type=Path)
    parser.add_argument("--samples-in", type=Path)
    args = parser.parse_args(argv)
    if args.samples_in:
        samples = json.loads(args.samples_in.read_text())
    else:
        wanted = set(args.scenarios.split(","))
        samples = {}
        for scenario in SCENARIOS:
            if scenario.name in wanted:
                print(f"recording {scenario.name} ...", file=sys.stderr, flush=True)
                samples[scenario.name] = record(scenario, args.connections, args.response)
        if args.samples_out:
            args.samples_out.write_text(json.dumps(samples))
    for line in report(samples):
        print(line)
    return 0


def _timed(function: Callable[[], int]) -> int:
    began = time.monotonic()
    try:
        return function()
    finally:
        print(f"took {time.monotonic() - began:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(_timed(main))
