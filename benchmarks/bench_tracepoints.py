"""What the tracepoints source costs: CPU per record and per connection, records lost, and the
throughput a connection-heavy workload keeps (wrk against nginx) with and without tcpwatch.

Run as root from the repository root::

    python benchmarks/bench_tracepoints.py [--seconds 5] [--repeats 3] [--connections 32]
        [--buffer BYTES] [--rate 20000 --rate-seconds 10 --processes 4 --clients 8]
        [--output docs/performance.md]

In a throw-away network namespace (``ip netns add``; ip_local_port_range 32768-65535, above the
listeners, and tcp_tw_reuse on, there only): Debian's nginx-light answers ``200 ok`` on
127.0.0.1, and wrk (``-H "Connection: close"``: every request is a new connection) drives it as
fast as the machine allows for ``--seconds``. Each repetition runs these modes in turn, so noise
from the shared machine falls on all of them alike (and each mode's throughput is also given as
a ratio to ``none`` of the same repetition, taken just before it, so the spread shows):

* ``none``: the workload alone;
* ``reader``: beside it, a process holding a TracepointReader (tcpwatch/sources/tracepoints.py)
  in the host's namespace, fed as serve's gathering thread feeds it (readable descriptor, then
  ``read_delay``) and drained once a second for the benchmark's namespace. It reports the CPU
  spent reading (``time.thread_time`` around ``read_ready`` and ``drain``), its whole process
  CPU, records read per event (every namespace's: tracepoints are global), records lost
  (PERF_RECORD_LOST) and the connects it attributed to the namespace;
* ``serve-off`` / ``serve-on``: ``tcpwatch serve`` in the namespace (``interval 1``) with
  ``collect.tracepoints`` false, then true; its process CPU from /proc.

The connection rate is wrk's requests/s; one nginx worker and one wrk thread make about 10,000
a second here. For the cost at a given rate (issue 17: 20,000 connections/s), each repetition
then runs the same four modes beside churn.py's paced generator (``loop --processes --rate``:
Python clients and accept-and-close servers on one port, several processes so both CPUs
churn) for ``--rate-seconds``; the rate is not assumed but read from the kernel, the
namespace's TcpActiveOpens (nstat's counter) over the window, and serve-on's records and lost
records are read from its /metrics (``tcpwatch_tracepoint_records_total``,
``tcpwatch_tracepoint_records_lost_total``) at the window's ends. The machine's 1-minute load
average is reported with each part. On a shared machine throughput is noisy, so the
kernel's side is also measured as CPU time: a client process in the namespace connects and
closes ``--client-connects`` times on loopback (both ends its own, every packet processed in its
context) and reports its own CPU (``getrusage``, user + system) per connection, alternately
without and with the reader running: the difference is what the tracepoints cost the traced
work itself. Prints a Markdown report (and writes it between the
``<!-- bench_tracepoints results -->`` markers of ``--output``). A benchmark, not a test:
nothing passes or fails on time. Everything is removed in ``finally`` blocks; children die with
the benchmark (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import churn
from namespace import Namespace

REPO = Path(__file__).resolve().parent.parent
PORT = 20901
CHURN_PORT = 20900
SERVE_PORT = 20902  # plus the run's number: one serve's port is never another's to wait for
# none and serve-on side by side: their ratio in each repetition is the throughput effect.
MODES = ("none", "serve-on", "reader", "serve-off")
MARKERS = ("<!-- bench_tracepoints results -->", "<!-- /bench_tracepoints results -->")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

NGINX = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

READER = r"""
import json, resource, select, sys, time
from tcpwatch.config import CollectSettings
from tcpwatch.model import NetnsIdentity, Snapshot
from tcpwatch.sources.base import Partial
from tcpwatch.sources.tracepoints import TracepointReader
inode, buffer = int(sys.argv[1]), int(sys.argv[2])
reader = TracepointReader(CollectSettings(tracepoint_buffer=buffer))
snapshot = Snapshot("bench", 0.0, None, None, None, None, None, identity=NetnsIdentity(inode))
connects = 0
def drain():  # a namespace's share is what came since the previous drain: add them up
    global connects
    value = reader.drain([snapshot])
    share = (value.value if isinstance(value, Partial) else value)[inode]
    connects += sum(row.count + sum(row.failures.values()) for row in share.connects)
    return share
def process_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
drain()
start, read_cpu, last = process_cpu(), 0.0, time.monotonic()
base = drain().host
connects = 0
base_lost_records = reader.records.lost
print("ready", flush=True)
while True:
    readable, _, _ = select.select([reader, sys.stdin], [], [], 1.0)
    if reader in readable:
        began = time.thread_time()
        reader.read_ready()
        read_cpu += time.thread_time() - began
        time.sleep(reader.read_delay)  # as the gathering thread does
    if time.monotonic() - last >= 1.0:
        began = time.thread_time()
        drain()
        read_cpu += time.thread_time() - began
        last = time.monotonic()
    if sys.stdin in readable and not sys.stdin.readline():
        break
began = time.thread_time()
share = drain()
read_cpu += time.thread_time() - began
host = share.host
records = {k: v - base.records.get(k, 0) for k, v in host.records.items()}
print(json.dumps({
    "records": records, "lost": host.lost - base.lost,
    "lost_records": reader.records.lost - base_lost_records,
    "connects": connects,
    "unattributed": sum(host.unattributed.values()) - sum(base.unattributed.values()),
    "read_cpu": read_cpu, "process_cpu": process_cpu() - start,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "buffer": host.buffer_bytes, "cpus": host.cpus, "delay": reader.read_delay,
}), flush=True)
"""


CLIENT = r"""
import resource, socket, sys, threading
count = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
port = listener.getsockname()[1]
def accept():
    for _ in range(count):
        listener.accept()[0].close()
threading.Thread(target=accept, daemon=True).start()
before = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(count):
    client = socket.create_connection(("127.0.0.1", port))
    client.close()
after = resource.getrusage(resource.RUSAGE_SELF)
user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
print(user, system, flush=True)
"""


@dataclass
class Run:
    mode: str
    rate: float  # wrk requests/s = connections/s
    seconds: float
    reader: dict[str, object] = field(default_factory=dict)
    serve_cpu: float | None = None
    load: float = 0.0  # 1-minute load average after the run


@dataclass
class RateRun:
    """One mode at a paced connection rate: what the kernel counted, what tcpwatch spent."""

    mode: str
    opens: int  # TcpActiveOpens of the namespace over the window (nstat's counter)
    seconds: float
    load: float  # 1-minute load average at the window's end
    reader: dict[str, object] = field(default_factory=dict)
    serve_cpu: float | None = None
    serve_records: int | None = None  # tcpwatch_tracepoint_records_total over the window
    serve_lost: int | None = None  # tcpwatch_tracepoint_records_lost_total over the window

    @property
    def rate(self) -> float:
        return self.opens / self.seconds


def _load() -> float:
    with open("/proc/loadavg", encoding="ascii") as handle:
        return float(handle.read().split()[0])


def _active_opens(namespace: Namespace) -> int:
    """The namespace's Tcp ActiveOpens (/proc/net/snmp, what ``nstat`` shows as
    TcpActiveOpens): the connections its clients opened, counted by the kernel."""
    rows = [line.split() for line in namespace.read_net("snmp").splitlines()]
    names, values = (row for row in rows if row[0] == "Tcp:")
    return int(values[names.index("ActiveOpens")])


def _scrape(namespace: Namespace, port: int) -> tuple[int, int]:
    """serve's records read (every event) and records lost, from its /metrics."""
    with namespace.connect(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    body = b"".join(chunks).decode("utf-8", "replace")
    records = lost = 0
    for line in body.splitlines():
        if line.startswith("tcpwatch_tracepoint_records_total{"):
            records += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("tcpwatch_tracepoint_records_lost_total "):
            lost = int(float(line.rsplit(" ", 1)[1]))
    return records, lost


def rate_mode(
    mode: str, namespace: Namespace, scratch: Path, args: argparse.Namespace, number: int
) -> RateRun:
    """The paced generator (churn.py loop, --processes) for --rate-seconds, in one mode."""
    helper: subprocess.Popen[str] | None = None
    generator: subprocess.Popen[str] | None = None
    port = SERVE_PORT + number
    try:
        if mode.startswith("serve"):
            helper = _start_serve(mode, namespace, scratch, args, port)
        generator = namespace.spawn(
            churn.argv(
                "loop", "--port", CHURN_PORT, "--processes", args.processes,
                "--clients", args.clients, "--rate", args.rate, "--backlog", 4096,
                "--seconds", args.rate_seconds + 15,
            ),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert generator.stdout is not None
        if generator.stdout.readline().strip() != "churning":
            raise RuntimeError("churn.py did not start")
        time.sleep(1.0)  # every process at its pace
        if mode == "reader":
            helper = _start_reader(namespace, args)
        scraped = _scrape(namespace, port) if mode == "serve-on" else (0, 0)
        cpu = _cpu_of(helper.pid) if helper is not None else 0.0
        opens, started = _active_opens(namespace), time.monotonic()
        time.sleep(args.rate_seconds)
        opens, elapsed = _active_opens(namespace) - opens, time.monotonic() - started
        result = RateRun(mode, opens, elapsed, _load())
        if mode.startswith("serve") and helper is not None:
            result.serve_cpu = _cpu_of(helper.pid) - cpu
        if mode == "serve-on":
            records, lost = _scrape(namespace, port)
            result.serve_records, result.serve_lost = records - scraped[0], lost - scraped[1]
        if mode == "reader" and helper is not None:
            out, _ = helper.communicate("", timeout=60)
            result.reader = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        for child in (generator, helper):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(10)


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _wrk(namespace: Namespace, seconds: float, connections: int) -> float:
    wrk = namespace.spawn(
        [
            "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-H", "Connection: close",
            f"http://127.0.0.1:{PORT}/",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out, _ = wrk.communicate(timeout=seconds + 60)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no rate: {out[-300:]}")
    return float(match.group(1))


def _wait_listening(namespace: Namespace, port: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            namespace.connect(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:g} s")


def _start_reader(namespace: Namespace, args: argparse.Namespace) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(namespace.inode()), str(args.buffer)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
        preexec_fn=churn.die_with_parent,
    )  # fmt: skip
    assert reader.stdout is not None
    if reader.stdout.readline().strip() != "ready":
        reader.kill()
        reader.wait(10)
        raise RuntimeError("the reader did not start")
    return reader


def _start_serve(
    mode: str, namespace: Namespace, scratch: Path, args: argparse.Namespace, port: int
) -> subprocess.Popen[str]:
    """``tcpwatch serve`` in the namespace, tracepoints on or off, after its first polls."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    config = scratch / f"{mode}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\ninterval: 1\ncollect:\n"
        f"  tracepoints: {'true' if mode == 'serve-on' else 'false'}\n"
        f"  tracepoint_buffer: {args.buffer}\n"
    )
    log = scratch / f"{mode}.log"
    with open(log, "w") as stderr:
        serve: subprocess.Popen[str] = namespace.spawn(
            [sys.executable, "-m", "tcpwatch", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=str(REPO), text=True,
        )  # fmt: skip
    try:
        _wait_listening(namespace, port)
    except RuntimeError as error:
        serve.kill()
        serve.wait(10)
        raise RuntimeError(f"{error}; serve's log: {log.read_text()[-500:]}") from None
    time.sleep(2.0)  # the first polls are done: measure the steady state
    return serve


def run_mode(
    mode: str, namespace: Namespace, scratch: Path, args: argparse.Namespace, number: int
) -> Run:
    helper: subprocess.Popen[str] | None = None
    try:
        if mode == "reader":
            helper = _start_reader(namespace, args)
        elif mode.startswith("serve"):
            helper = _start_serve(mode, namespace, scratch, args, SERVE_PORT + number)
        serve_before = _cpu_of(helper.pid) if mode.startswith("serve") and helper else 0.0
        started = time.monotonic()
        rate = _wrk(namespace, args.seconds, args.connections)
        elapsed = time.monotonic() - started
        result = Run(mode, rate, elapsed, load=_load())
        if helper is not None and mode.startswith("serve"):
            result.serve_cpu = _cpu_of(helper.pid) - serve_before
        if mode == "reader" and helper is not None:
            time.sleep(0.5)  # the last records reach the reader
            out, _ = helper.communicate("", timeout=60)
            result.reader = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        if helper is not None and helper.poll() is None:
            helper.kill()
            helper.wait(10)


def client_cpu(namespace: Namespace, args: argparse.Namespace, with_reader: bool) -> float:
    """CPU seconds per connection of the client process (user + system), reader on or off."""
    reader: subprocess.Popen[str] | None = None
    try:
        if with_reader:
            reader = _start_reader(namespace, args)
        client = namespace.spawn(
            [sys.executable, "-c", CLIENT, str(args.client_connects)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = client.communicate(timeout=600)
        user, system = (float(word) for word in out.split())
        connects: int = args.client_connects
        return (user + system) / connects
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(10)


def _spread(values: list[float], scale: float = 1.0, form: str = "{:.1%}") -> str:
    """median (min-max) of the values, each times ``scale``."""
    ordered = sorted(value * scale for value in values)
    middle = statistics.median(ordered)
    if len(ordered) < 2:
        return form.format(middle)
    return f"{form.format(middle)} ({form.format(ordered[0])}-{form.format(ordered[-1])})"


def rate_report(rate_runs: list[RateRun], args: argparse.Namespace) -> list[str]:
    by_mode = {mode: [run for run in rate_runs if run.mode == mode] for mode in MODES}
    loads = [run.load for run in rate_runs]
    lines = [
        "",
        f"At a paced rate: `churn.py loop --processes {args.processes} --clients "
        f"{args.clients} --rate {args.rate:g}` (Python clients and accept-and-close servers "
        f"on one port) for {args.rate_seconds:g} s per mode, {args.repeats} repetitions; "
        "connections/s is the namespace's TcpActiveOpens (nstat) over the window, not the "
        f"target; 1-minute load average {min(loads):.1f}-{max(loads):.1f}.",
        "",
        "| mode | connections/s, median (min-max) | tcpwatch CPU, median (min-max) |",
        "|---|---|---|",
    ]
    for mode in MODES:
        chosen = by_mode[mode]
        cpu = "-"
        if mode == "reader":
            shares = [float(r.reader["process_cpu"]) / r.seconds for r in chosen]  # type: ignore[arg-type]
            cpu = f"{_spread(shares)} of a CPU (reader process)"
        elif mode.startswith("serve"):
            shares = [(r.serve_cpu or 0.0) / r.seconds for r in chosen]
            cpu = f"{_spread(shares)} of a CPU (serve process)"
        rates = _spread([r.rate for r in chosen], form="{:,.0f}")
        lines.append(f"| {mode} | {rates} | {cpu} |")
    lines += [
        "",
        "| repetition | connections/s | connects attributed | records/s (all namespaces) "
        "| records / connection | lost (event counts / PERF_RECORD_LOST) | read CPU / record "
        "| process CPU / record | process CPU / connection | serve: CPU on - off, per record "
        "| per connection | serve-on lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = zip(by_mode["reader"], by_mode["serve-off"], by_mode["serve-on"], strict=True)
    for number, (reader, off, on) in enumerate(pairs, 1):
        stats = reader.reader
        records = sum(stats["records"].values())  # type: ignore[attr-defined]
        read_cpu = float(stats["read_cpu"])  # type: ignore[arg-type]
        process_cpu = float(stats["process_cpu"])  # type: ignore[arg-type]
        extra = (on.serve_cpu or 0.0) / on.seconds - (off.serve_cpu or 0.0) / off.seconds
        on_records = (on.serve_records or 0) / on.seconds
        lines.append(
            f"| {number} | {reader.rate:,.0f} | {int(stats['connects']):,} "  # type: ignore[call-overload]
            f"| {records / reader.seconds:,.0f} "
            f"| {records / max(reader.opens, 1):.1f} "
            f"| {stats['lost']} / {stats['lost_records']} "
            f"| {read_cpu / max(records, 1) * 1e6:.2f} us "
            f"| {process_cpu / max(records, 1) * 1e6:.2f} us "
            f"| {process_cpu / max(reader.opens, 1) * 1e6:.1f} us "
            f"| {extra / max(on_records, 1) * 1e6:.2f} us "
            f"| {extra / max(on.rate, 1) * 1e6:.1f} us | {on.serve_lost} |"
        )
    return lines


def throughput_ratios(runs: list[Run]) -> list[str]:
    """Each repetition's ratio to the workload alone (taken beside it), so the noise shows."""
    by_mode = {mode: [run for run in runs if run.mode == mode] for mode in MODES}
    lines = ["", "Throughput per repetition, vs `none` in the same repetition:"]
    for mode in MODES[1:]:
        ratios = [
            run.rate / base.rate for run, base in zip(by_mode[mode], by_mode["none"], strict=True)
        ]
        each = ", ".join(f"{ratio:.0%}" for ratio in ratios)
        lines.append(f"{mode} {_spread(ratios, form='{:.0%}')} (each: {each});")
    ratios = [
        on.rate / off.rate
        for on, off in zip(by_mode["serve-on"], by_mode["serve-off"], strict=True)
    ]
    loads = [run.load for run in runs]
    lines.append(
        f"serve-on vs serve-off {_spread(ratios, form='{:.0%}')}. 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f}."
    )
    return lines


def report(
    runs: list[Run],
    args: argparse.Namespace,
    clients: dict[bool, list[float]],
    rate_runs: list[RateRun],
) -> str:
    by_mode = {mode: [run for run in runs if run.mode == mode] for mode in MODES}
    base = statistics.median(run.rate for run in by_mode["none"])
    readers = [run.reader for run in by_mode["reader"]]
    first = readers[0]
    lines = [
        f"Linux {platform.release()}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
        f"(shared with other work); wrk -t1 -c{args.connections} with Connection: close for "
        f"{args.seconds:g} s, {args.repeats} repetitions (median); ring buffer "
        f"{first['buffer']} B per CPU on {first['cpus']} CPUs, read delay "
        f"{float(first['delay']) * 1000:.0f} ms.",  # type: ignore[arg-type]
        "",
        "| mode | connections/s (wrk) | vs none | tcpwatch CPU |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        chosen = by_mode[mode]
        rate = statistics.median(run.rate for run in chosen)
        cpu = ""
        if mode == "reader":
            share = statistics.median(
                float(r["process_cpu"]) / run.seconds  # type: ignore[arg-type]
                for run, r in zip(chosen, readers, strict=True)
            )
            cpu = f"{share * 100:.1f}% of a CPU (reader process)"
        elif mode.startswith("serve"):
            share = statistics.median((run.serve_cpu or 0.0) / run.seconds for run in chosen)
            cpu = f"{share * 100:.1f}% of a CPU (serve process)"
        lines.append(f"| {mode} | {rate:,.0f} | {rate / base:.1%} | {cpu} |")
    lines += [
        "",
        "| repetition | records read (all namespaces) | records/s | lost | read CPU / record "
        "| process CPU / record | connects attributed | read CPU / connection | unattributed "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, (run, reader) in enumerate(zip(by_mode["reader"], readers, strict=True), 1):
        records = sum(reader["records"].values())  # type: ignore[attr-defined]
        connects = int(reader["connects"])  # type: ignore[call-overload]
        read_cpu = float(reader["read_cpu"])  # type: ignore[arg-type]
        process_cpu = float(reader["process_cpu"])  # type: ignore[arg-type]
        lines.append(
            f"| {number} | {records:,} | {records / run.seconds:,.0f} | {reader['lost']} "
            f"| {read_cpu / max(records, 1) * 1e6:.2f} us "
            f"| {process_cpu / max(records, 1) * 1e6:.2f} us | {connects:,} "
            f"| {read_cpu / max(connects, 1) * 1e6:.1f} us | {reader['unattributed']} "
            f"| {int(reader['maxrss_kib']) / 1024:.1f} MiB |"  # type: ignore[call-overload]
        )
    off, on = statistics.median(clients[False]), statistics.median(clients[True])
    lines += [
        "",
        f"Client CPU per connection ({args.client_connects:,} sequential connects and closes on "
        "loopback, both ends in one process, user + system, median of "
        f"{len(clients[False])}): reader off {off * 1e6:.1f} us, reader on {on * 1e6:.1f} us, "
        f"difference {(on - off) * 1e6:+.1f} us ({(on - off) / off:+.1%}).",
    ]
    lines += throughput_ratios(runs)
    lines += rate_report(rate_runs, args)
    return "\n".join(lines)


def write_output(path: Path, text: str) -> None:
    current = path.read_text()
    start, end = MARKERS
    if start not in current or end not in current:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, _, rest = current.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32, help="wrk's open connections")
    parser.add_argument(
        "--buffer", type=int, default=0, help="ring buffer per CPU (0: tcpwatch's default)"
    )
    parser.add_argument("--output", type=Path, help="write the report into this Markdown file")
    parser.add_argument("--client-connects", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=20000, help="paced connections/s")
    parser.add_argument("--rate-seconds", type=float, help="window per paced mode (--seconds)")
    parser.add_argument("--processes", type=int, default=4, help="paced generator processes")
    parser.add_argument("--clients", type=int, default=8, help="client threads per process")
    args = parser.parse_args()
    if args.rate_seconds is None:
        args.rate_seconds = args.seconds
    if args.output is not None:
        # Checked before the minutes of measuring, not after them.
        start, end = MARKERS
        try:
            current = args.output.read_text()
        except OSError as error:
            parser.error(f"--output {args.output}: {error.strerror}")
        if start not in current or end not in current:
            parser.error(f"--output {args.output} has no {start} ... {end} markers")
    if os.geteuid() != 0:
        print("bench_tracepoints.py needs root (namespaces, perf_event_open)", file=sys.stderr)
        return 2
    namespace = Namespace.create("tw-bench-tp")
    nginx: subprocess.Popen[str] | None = None
    runs: list[Run] = []
    clients: dict[bool, list[float]] = {False: [], True: []}
    rate_runs: list[RateRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="tw-bench-tp-") as scratch:
            # Clients take ports above the listeners (nginx, serve), never one of theirs.
            namespace.write_sysctl("net.ipv4.ip_local_port_range", "32768 65535")
            namespace.write_sysctl("net.ipv4.tcp_tw_reuse", "1")
            config = Path(scratch) / "nginx.conf"
            config.write_text(NGINX.format(dir=scratch, port=PORT))
            nginx = namespace.spawn(
                ["nginx", "-c", str(config)], stdout=subprocess.DEVNULL, text=True
            )
            _wait_listening(namespace, PORT)
            for _ in range(args.repeats):
                for mode in MODES:
                    number = len(runs) + len(rate_runs)
                    runs.append(run_mode(mode, namespace, Path(scratch), args, number))
                    print(f"{mode}: {runs[-1].rate:,.0f} connections/s", file=sys.stderr)
                for mode in MODES:
                    number = len(runs) + len(rate_runs)
                    rate_runs.append(rate_mode(mode, namespace, Path(scratch), args, number))
                    run = rate_runs[-1]
                    print(
                        f"paced {mode}: {run.rate:,.0f} connections/s (load {run.load:.1f})",
                        file=sys.stderr,
                    )
                for with_reader in (False, True):
                    clients[with_reader].append(client_cpu(namespace, args, with_reader))
                    print(
                        f"client, reader {'on' if with_reader else 'off'}: "
                        f"{clients[with_reader][-1] * 1e6:.1f} us/connection",
                        file=sys.stderr,
                    )
    finally:
        if nginx is not None and nginx.poll() is None:
            # SIGTERM: the master stops its worker and waits for it. SIGKILL would leave the
            # worker running, orphaned, serving a namespace that no longer has a name.
            nginx.terminate()
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(10)
        namespace.delete()
    text = report(runs, args, clients, rate_runs)
    print(text)
    if args.output is not None:
        write_output(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
