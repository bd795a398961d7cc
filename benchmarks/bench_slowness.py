"""What reading where the time goes costs: this checkout's per-destination scan against another
checkout's (before issue 18), on one population, and the listeners' scan on its own.

Run as root from the repository root, with a baseline checkout beside it::

    git archive main | tar -x -C /tmp/baseline      # or a git worktree of the older commit
    python benchmarks/bench_slowness.py --baseline /tmp/baseline [--connections 9000]

A population process in a throw-away namespace holds N loopback connections (both ends: N
outbound ESTABLISHED on ephemeral ports, N inbound, to four listeners). Two measuring processes,
one importing each checkout, take turns (so a load on the shared machine hits both alike): each
turn times ``sockets.collect()`` ``--scans`` times with the per-destination scan's tcp_info and
``--scans`` times without (process CPU, user + system), and this checkout also times its
listeners' scan (``inbound.scan`` at the default ``collect.inbound_connections``). It prints the
medians over the turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from namespace import Namespace

REPO = Path(__file__).resolve().parent.parent

POPULATION = r"""
import resource, socket, sys, time
connections = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
listeners = []
for index in range(4):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 9000 + index))
    listener.listen(4096)
    listeners.append(listener)
held = []
for n in range(connections):
    client = socket.create_connection(("127.0.0.1", 9000 + n % 4))
    server, _ = listeners[n % 4].accept()
    held += [client, server]
print("ready", flush=True)
sys.stdin.read()
"""

MEASURE = r"""
import json, statistics, sys, time
from tcpwatch.sources import sockets
try:
    from tcpwatch.sources import inbound
except ImportError:  # a checkout from before the listeners' scan
    inbound = None

def inuse():
    counts = {}
    for name, family in (("sockstat", "ipv4"), ("sockstat6", "ipv6")):
        with open(f"/proc/net/{name}") as handle:
            for line in handle:
                if line.startswith(("TCP:", "TCP6:")):
                    words = line.split()
                    counts[family] = int(words[words.index("inuse") + 1])
    return counts

def timed(function, scans):
    times = []
    for _ in range(scans):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return statistics.median(times)

scans = int(sys.argv[1])
if inbound is not None:
    from tcpwatch.config import CollectSettings
    limit = CollectSettings().inbound_connections
for line in sys.stdin:
    table = sockets.collect((32768, 60999), inuse(), time_wait=0)
    result = {
        "with": timed(lambda: sockets.collect((32768, 60999), inuse(), time_wait=0), scans),
        "without": timed(
            lambda: sockets.collect((32768, 60999), inuse(), time_wait=0, live_info=False), scans
        ),
    }
    if inbound is not None:
        result["inbound"] = timed(
            lambda: inbound.scan(table.listeners, (32768, 60999), limit, 0.0), scans
        )
    print(json.dumps(result), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="a checkout to compare with")
    parser.add_argument("--connections", type=int, default=9000)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--scans", type=int, default=9)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_slowness.py needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    trees = {"baseline": Path(args.baseline).resolve(), "this checkout": REPO}
    namespace = Namespace.create("tw-bench-slow")
    children: list[subprocess.Popen[str]] = []
    try:
        population = namespace.spawn(
            [sys.executable, "-c", POPULATION, str(args.connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        children.append(population)
        assert population.stdout is not None and population.stdout.readline().strip() == "ready"
        measuring = {}
        for name, tree in trees.items():
            child = namespace.spawn(
                [sys.executable, "-c", MEASURE, str(args.scans)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=dict(os.environ, PYTHONPATH=str(tree)), cwd=str(tree),
            )  # fmt: skip
            children.append(child)
            measuring[name] = child
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.turns):
            for name, child in measuring.items():
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("turn\n")
                child.stdin.flush()
                results[name].append(json.loads(child.stdout.readline()))
        n = args.connections
        print(f"{n} outbound + {n} inbound ESTABLISHED, {args.turns} turns of {args.scans} "
              "scans each, medians of the turns' medians (process CPU):")  # fmt: skip
        for name, turns in results.items():
            with_info = statistics.median(t["with"] for t in turns)
            without = statistics.median(t["without"] for t in turns)
            line = (
                f"  {name}: collect() {without * 1000:.1f} ms without tcp_info, "
                f"{with_info * 1000:.1f} ms with (+{(with_info - without) / n * 1e6:.2f} us per "
                "outbound connection)"
            )
            if all("inbound" in t for t in turns):
                scan = statistics.median(t["inbound"] for t in turns)
                line += f"; listeners' scan {scan * 1000:.1f} ms (at its default limit)"
            print(line)
        return 0
    finally:
        for child in children:
            child.kill()
            child.wait()
        namespace.delete()


if __name__ == "__main__":
    sys.exit(main())
