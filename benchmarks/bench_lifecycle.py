"""CPU per closed connection: tcpwatch's destroy-event reader beside ``ss -tinE``, same stream.

Run as root from the repository root::

    python benchmarks/bench_lifecycle.py [--rates 1000,10000,0] [--seconds 5]
        [--receive-buffer BYTES] [--clients 2]

For each rate (closed connections per second; 0 = as fast as loopback allows here), in a
throw-away network namespace (``ip netns add``; ip_local_port_range widened there only):

* a reader process holding a ``DestroyListener`` (tcpwatch/sources/lifecycle.py), reading when
  its socket is readable and draining once a second as the poll would; it reports the CPU
  spent in ``read_ready`` (``time.thread_time``), its whole process CPU from "ready" to the end,
  events counted, events lost (``SO_MEMINFO`` drops) and its peak RSS;
* ``ss -tinE > /dev/null`` on the same stream; its CPU from ``wait4`` after SIGTERM;
* churn: a server process accepting and closing at once on four ports, and client processes
  each connecting, reading EOF and closing at a paced rate. Every connection yields two destroy
  events (both ends live in the namespace).

Prints a Markdown table. A benchmark, not a test: nothing passes or fails on time. Everything
is removed in ``finally`` blocks; children die with the benchmark (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from namespace import Namespace

REPO = Path(__file__).resolve().parent.parent
PORTS = (20801, 20802, 20803, 20804)

READER = r"""
import json, resource, select, sys, time
from tcpwatch.sources.lifecycle import DestroyListener
listener = DestroyListener(receive_buffer=int(sys.argv[1]))
listener.update_context(frozenset(json.loads(sys.argv[2])), (1024, 65535))
delay = float(sys.argv[3])
def process_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start = process_cpu()
read_cpu = 0.0
last_drain = time.monotonic()
print("ready", flush=True)
while True:
    readable, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
    if listener in readable:
        began = time.thread_time()
        listener.read_ready()
        read_cpu += time.thread_time() - began
        if delay:
            time.sleep(delay)  # let events gather: one wake-up reads many
    if time.monotonic() - last_drain >= 1.0:
        listener.drain()
        last_drain = time.monotonic()
    if sys.stdin in readable and not sys.stdin.readline():
        break
began = time.thread_time()
listener.read_ready()
read_cpu += time.thread_time() - began
stats = listener.drain()
print(json.dumps({
    "events": stats.events, "lost": stats.lost, "overruns": stats.overruns,
    "peers": len(stats.peers), "read_cpu": read_cpu, "process_cpu": process_cpu() - start,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "receive_buffer": stats.receive_buffer,
}), flush=True)
"""

SERVER = r"""
import selectors, socket, sys
ports = [int(p) for p in sys.argv[1].split(",")]
selector = selectors.DefaultSelector()
for port in ports:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        for _ in range(64):
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                break
            conn.close()  # the server closes first: TIME_WAIT stays on its side
"""

CLIENT = r"""
import socket, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
ports = [int(p) for p in sys.argv[3].split(",")]
made = failed = 0
start = time.monotonic()
end = start + seconds
while True:
    now = time.monotonic()
    if now >= end:
        break
    if rate and made + failed >= (now - start) * rate:
        time.sleep(0.0005)
        continue
    try:
        sock = socket.create_connection(("127.0.0.1", ports[(made + failed) % len(ports)]))
        sock.recv(1)
        sock.close()
        made += 1
    except OSError:
        failed += 1
print(made, failed, time.monotonic() - start, flush=True)
"""


@dataclass
class Result:
    rate: int
    connections: int
    failed: int
    seconds: float
    reader: dict[str, float]
    ss_cpu: float
    ss_note: str


def run_rate(rate: int, seconds: float, receive_buffer: int, clients: int, delay: float) -> Result:
    namespace = Namespace.create("tw-bench-lc")
    ss_errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in finally)
    children: list[subprocess.Popen[str]] = []
    try:
        namespace.write_sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        namespace.write_sysctl("net.ipv4.tcp_tw_reuse", "1")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        ports = ",".join(str(port) for port in PORTS)

        def spawn(argv: list[str]) -> subprocess.Popen[str]:
            child = namespace.spawn(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=str(REPO),
            )
            children.append(child)
            return child

        reader = spawn(
            [
                sys.executable,
                "-c",
                READER,
                str(receive_buffer),
                json.dumps(list(PORTS)),
                str(delay),
            ]
        )
        ss = namespace.spawn(["ss", "-tinE"], stdout=subprocess.DEVNULL, stderr=ss_errors)
        server = spawn([sys.executable, "-c", SERVER, ports])
        for child in (reader, server):
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{child.args[:3]} did not start")
        time.sleep(0.5)  # ss subscribes
        per_client = rate / clients if rate else 0
        workers = [
            spawn([sys.executable, "-c", CLIENT, str(per_client), str(seconds), ports])
            for _ in range(clients)
        ]
        made = failed = 0
        elapsed = 0.0
        for worker in workers:
            out, _ = worker.communicate(timeout=seconds + 60)
            counts = out.split()
            made += int(counts[0])
            failed += int(counts[1])
            elapsed = max(elapsed, float(counts[2]))
        time.sleep(1.0)  # the last events reach both readers
        ss_note = ""
        pid, status, usage = os.wait4(ss.pid, os.WNOHANG)  # reaps it if it exited early
        if pid == 0:
            os.kill(ss.pid, signal.SIGTERM)
            _, status, usage = os.wait4(ss.pid, 0)
        ss.returncode = 0
        if not os.WIFSIGNALED(status):
            ss_errors.seek(0)
            ss_note = (
                f"ss exited {os.waitstatus_to_exitcode(status)}: "
                + " ".join(ss_errors.read().split())[:120]
            )
        ss_cpu = usage.ru_utime + usage.ru_stime
        out, _ = reader.communicate("", timeout=60)
        stats = json.loads(out.strip().splitlines()[-1])
        return Result(rate, made, failed, elapsed, stats, ss_cpu, ss_note)
    finally:
        ss_errors.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        namespace.delete()


def report(results: list[Result], receive_buffer: int, delay: float) -> str:
    lines = [
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; receive buffer asked {receive_buffer} B, "
        f"granted {results[0].reader['receive_buffer']} B; reader sleeps {delay} s after "
        "each read.",
        "",
        "| target conn/s | achieved conn/s | events/s | events counted | lost | overruns "
        "| tcpwatch read_ready CPU / 1k events | tcpwatch process CPU / 1k events "
        "| ss -tinE CPU / 1k events | reader peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        reader = result.reader
        events = int(reader["events"])
        seen = events + int(reader["lost"] or 0)  # what the kernel sent
        per_k = 1000 / events if events else 0.0  # tcpwatch: per event it processed
        ss_per_k = 1000 / seen if seen else 0.0
        lines.append(
            f"| {result.rate or 'max'} | {result.connections / result.seconds:,.0f} "
            f"| {seen / result.seconds:,.0f} | {events:,} | {reader['lost']} "
            f"| {reader['overruns']} | {reader['read_cpu'] * per_k * 1000:.1f} ms "
            f"| {reader['process_cpu'] * per_k * 1000:.1f} ms "
            f"| {result.ss_cpu * ss_per_k * 1000:.1f} ms "
            f"| {reader['maxrss_kib'] / 1024:.1f} MiB |"
        )
    notes = [f"- target {r.rate or 'max'}: {r.ss_note}" for r in results if r.ss_note]
    if any(r.failed for r in results):
        notes += [f"- target {r.rate or 'max'}: {r.failed} connects failed" for r in results]
    return "\n".join(lines + (["", *notes] if notes else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="1000,10000,0", help="connections/s; 0 = max")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--receive-buffer", type=int, default=4 << 20)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument(
        "--read-delay",
        type=float,
        default=0.0,
        help="seconds the reader sleeps after each read (0: it wakes for every event)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_lifecycle.py needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    results = [
        run_rate(int(rate), args.seconds, args.receive_buffer, args.clients, args.read_delay)
        for rate in args.rates.split(",")
    ]
    print(report(results, args.receive_buffer, args.read_delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
