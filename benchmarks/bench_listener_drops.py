"""What asking for the listeners' drops (INET_DIAG_SKMEMINFO) costs the first dump.

Run as root from the repository root::

    python benchmarks/bench_listener_drops.py [--connections 9000] [--rounds 8]

A child process in a throw-away namespace opens N loopback connections (both ends held, so 2N
ESTABLISHED sockets) to four listeners, then times the dumps of both families (process CPU, user
+ system, kernel walk included) with and without the SKMEMINFO extension: every state but
ESTABLISHED (derived mode, what every poll does), every state (ESTABLISHED dumped: under churn or
``collect.established: dumped``), and LISTEN alone (the alternative of a dump of its own). Rounds
are interleaved; medians are printed.
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
from tcpwatch.sources import netlink, sockdiag
from tcpwatch.sources.sockets import run_dump
connections, rounds = int(sys.argv[1]), int(sys.argv[2])
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
connection = netlink.open_socket()
buffer = memoryview(bytearray(1 << 17))

def dump_cpu(mask, extensions):
    aggregator = sockdiag.DumpAggregator((32768, 60999))
    start = time.process_time()
    for family in ("ipv4", "ipv6"):
        request = netlink.build_request(family, mask, b"", 1, extensions)
        run_dump(connection.send, connection.recv_into, request, family, aggregator, buffer)
    return time.process_time() - start

ALL = sockdiag.ALL_STATES_MASK
DERIVED = ALL & ~sockdiag.ESTABLISHED_MASK
LISTEN = 1 << sockdiag.TCP_LISTEN
cases = {
    "every state but ESTABLISHED": (DERIVED, 0),
    "every state but ESTABLISHED, SKMEMINFO": (DERIVED, netlink.SKMEMINFO_EXTENSION),
    "every state": (ALL, 0),
    "every state, SKMEMINFO": (ALL, netlink.SKMEMINFO_EXTENSION),
    "LISTEN only, SKMEMINFO": (LISTEN, netlink.SKMEMINFO_EXTENSION),
}
times = {name: [] for name in cases}
for _ in range(rounds):
    for name, (mask, extensions) in cases.items():
        times[name].append(dump_cpu(mask, extensions))
print(f"{2 * connections} ESTABLISHED + 4 LISTEN, median CPU of both families' dumps:")
for name, values in times.items():
    print(f"  {name:42s} {statistics.median(values) * 1000:7.2f} ms")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=9000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_listener_drops.py needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    namespace = Namespace.create("tw-bench-ld")
    try:
        child = namespace.spawn(
            [sys.executable, "-c", CHILD, str(args.connections), str(args.rounds)],
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
