"""What the ``owners`` source adds to a poll: psutil descriptions of N listeners' owners.

    python benchmarks/bench_owners.py [--listeners 1,8,32,64] [--fds 16,1000] [--repeats 50]

For each (N, F): N child processes, each holding F open descriptors (/dev/null), are made the
owners of N listeners in a built snapshot (one listener each, attributed as the ``processes``
source would); then ``read_owners_source`` (the source's whole read: choosing the owners and
describing each with psutil) is timed ``--repeats`` times and the median and the 90th percentile
printed, with the CPU time it used. The source describes at most 32 listeners' owners, so 64
listeners cost what 32 do. No socket is opened: the source reads /proc/PID, not the sockets, so
this needs no network namespace. The children are ours, so prlimit(2) is allowed; the daemon's
fallback for other users' processes (reading /proc/PID/limits) is one more small file read.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcpwatch.config import CollectSettings
from tcpwatch.model import (
    STATES,
    Attribution,
    Listener,
    ProcessRef,
    Snapshot,
    SocketTable,
)
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.base import SourceContext
from tcpwatch.sources.owners import MAX_LISTENER_OWNERS, read_owners_source

CHILD = (
    "import os, sys, time\n"
    "fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(int(sys.argv[1]))]\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def spawn(count: int, fds: int) -> list[subprocess.Popen[str]]:
    children = []
    for _ in range(count):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(fds)], stdout=subprocess.PIPE, text=True
        )
        children.append(child)
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return children


def snapshot_of(children: list[subprocess.Popen[str]]) -> Snapshot:
    listeners = tuple(
        Listener("ipv4", "127.0.0.1", 20000 + i, 0, 4096, 0, 10_000 + i)
        for i in range(len(children))
    )
    owners = {10_000 + i: ProcessRef(child.pid, "python3") for i, child in enumerate(children)}
    table = SocketTable(
        counts={"ipv4": dict.fromkeys(STATES, 0), "ipv6": dict.fromkeys(STATES, 0)},
        listeners=listeners,
        ephemeral_use=(),
        syn_sent=(),
        self_connects=(),
        inodes_by_state={"close_wait": frozenset()},
        established_method="derived",
        messages=0,
    )
    attribution = Attribution(owners, processes_scanned=len(owners), complete=True)
    return Snapshot("host", time.time(), table, None, None, None, attribution)


def measure(listeners: int, fds: int, repeats: int) -> tuple[float, float, float, int]:
    """Median and p90 wall time, median CPU time (seconds) per read; owners described."""
    children = spawn(listeners, fds)
    try:
        snapshots = [snapshot_of(children)]
        context = SourceContext(ProcPaths(), CollectSettings(), "host", 0, time.time())
        described = read_owners_source.read(context, snapshots)  # warm-up
        walls, cpus = [], []
        for _ in range(repeats):
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            read_owners_source.read(context, snapshots)
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpus.append(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime)
        walls.sort()
        p90 = walls[min(len(walls) - 1, int(len(walls) * 0.9))]
        count = len(described.processes)  # type: ignore[attr-defined]
        return statistics.median(walls), p90, statistics.median(cpus), count
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listeners", default="1,8,32,64")
    parser.add_argument("--fds", default="16,1000")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"owners source, {os.cpu_count()} CPUs, described at most {MAX_LISTENER_OWNERS}\n")
    print("| listeners | fds per owner | owners described | median | p90 | CPU (median) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for fds in (int(value) for value in args.fds.split(",")):
        for listeners in (int(value) for value in args.listeners.split(",")):
            median, p90, cpu, count = measure(listeners, fds, args.repeats)
            print(
                f"| {listeners} | {fds} | {count} | {median * 1e3:.2f} ms | {p90 * 1e3:.2f} ms "
                f"| {cpu * 1e3:.2f} ms |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
