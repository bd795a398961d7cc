"""What INET_DIAG_INFO costs the per-destination scan: sockets.collect() with and without it.

Run as root from the repository root::

    python benchmarks/bench_live_info.py [--connections 9000] [--rounds 6] [--scans 15]

A child process in a throw-away namespace opens N loopback connections (both ends: N outbound
ESTABLISHED on ephemeral ports, N inbound) to four listeners, then times ``collect()`` (process
CPU, user + system) with ``live_info=False`` and ``live_info=True``, interleaved in rounds, and
prints the medians and the difference per outbound connection.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from namespace import Namespace

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import resource, socket, statistics, sys, time
from tcpwatch.sources import sockets
connections, rounds, scans = (int(word) for word in sys.argv[1:4])
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

def inuse():
    counts = {}
    for name, family in (("sockstat", "ipv4"), ("sockstat6", "ipv6")):
        with open(f"/proc/net/{name}") as handle:
            for line in handle:
                if line.startswith(("TCP:", "TCP6:")):
                    words = line.split()
                    counts[family] = int(words[words.index("inuse") + 1])
    return counts

def median_cpu(live_info):
    times = []
    for _ in range(scans):
        counts = inuse()
        start = time.process_time()
        sockets.collect((32768, 60999), counts, time_wait=0, live_info=live_info)
        times.append(time.process_time() - start)
    return statistics.median(times)

without, with_info = [], []
for _ in range(rounds):
    without.append(median_cpu(False))
    with_info.append(median_cpu(True))
base, info = statistics.median(without), statistics.median(with_info)
print(f"{connections} outbound + {connections} inbound ESTABLISHED: collect() "
      f"{base * 1000:.1f} ms without tcp_info, {info * 1000:.1f} ms with "
      f"(+{(info - base) / connections * 1e6:.2f} us per outbound connection)")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=9000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--scans", type=int, default=15)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_live_info.py needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    namespace = Namespace.create("tw-bench-li")
    try:
        child = namespace.spawn(
            [sys.executable, "-c", CHILD, str(args.connections), str(args.rounds), str(args.scans)],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=str(REPO),
        )
        return child.wait(timeout=600)
    except subprocess.TimeoutExpired:
        child.kill()
        return 2
    finally:
        namespace.delete()


if __name__ == "__main__":
    sys.exit(main())
