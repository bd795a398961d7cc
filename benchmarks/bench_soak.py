"""Soak: a real `tcpwatch serve` under connection churn, scraped every second, for minutes.

Run as root from the repository root::

    .venv/bin/python benchmarks/bench_soak.py --minutes 10 --output docs/performance.md

(the interpreter that has tcpwatch installed: the daemon is started with it).

In a throw-away namespace (``tw-soak-<random>``): a known population of long-lived loopback
connections, and churn processes (each a listener that accepts and closes at once plus client
threads that connect, wait for that close and close; the server closes first, so TIME_WAIT stays
on its side). ``python -m tcpwatch serve --netns 'tw-soak-<random>*' --interval 1s`` runs there;
throw-away namespaces ``tw-soak-<random>-<random>`` appear and vanish beside it, so the daemon
enters, names and forgets namespaces all along; SIGHUP reloads its configuration every minute.

Every second: one GET /metrics on a new connection (failed: an error, a timeout of 5 s or a
status other than 200), then ``ss -4 -tanH state established`` in the namespace, then the
daemon's RSS, threads and descriptors from /proc. ESTABLISHED from each poll (deduplicated by
``tcpwatch_last_poll_timestamp_seconds``) is compared with the exact band of the population: the
long-lived sockets plus at most two per churn client in flight, the scrape's own connection and
the walk slack of a non-atomic dump (tests/integration/test_established_churn.py). ``ss`` gives
the same comparison for a tool outside tcpwatch, read a moment later.

A Markdown report goes to stdout and, with ``--output FILE``, between the
``<!-- bench_soak results -->`` markers of FILE. Everything is bounded (run time, clients,
namespaces alive at once, every request and command) and removed in ``finally``: churn, population
and daemon are killed and every namespace deleted, on Ctrl-C and SIGTERM too; children die with
the benchmark (PR_SET_PDEATHSIG). Exit status: 0 when no scrape failed, 1 otherwise, 2 when the run
itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from namespace import Namespace, NamespaceError

REPO_ROOT = Path(__file__).resolve().parents[1]
PORT = 19477
POPULATION_PORT = 7000
CHURN_PORT = 7100
SCRAPE_TIMEOUT = 5.0
WALK_SLACK = 4  # a dump is not atomic: measured at most 2 in the churn test, 4 allowed there
MAX_EXTRA_NAMESPACES = 3
MARKERS = ("<!-- bench_soak results -->", "<!-- /bench_soak results -->")

_POPULATION = """
import socket, sys, time
pairs, port, lifetime = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(1024)
held = [listener]
for _ in range(pairs):
    held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    held.append(listener.accept()[0])
print("ready", flush=True)
time.sleep(lifetime)
"""

# One process: a listener that accepts and closes at once, and client threads that connect,
# wait for that close and close. Bounded by its own deadline.
CHURN = str(Path(__file__).resolve().parent / "churn.py")  # the shared generator

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


class Interrupted(Exception):
    """SIGTERM or SIGINT: unwind through every finally block."""


@dataclass(slots=True)
class Second:
    """What one second of the soak saw."""

    at: float  # seconds since the start
    scrape_ok: bool
    scrape_seconds: float
    error: str = ""
    established: int | None = None  # tcpwatch's, ipv4, of the main namespace
    poll_at: float | None = None  # tcpwatch_last_poll_timestamp_seconds
    dumped: int | None = None  # tcpwatch_established_dumped
    sources_down: int = 0
    namespaces: int = 0  # tcpwatch_netns_polled
    ss_established: int | None = None
    rss_kib: int = 0
    threads: int = 0
    fds: int = 0
    cpu: float = 0.0  # the daemon's user + system seconds so far (/proc/PID/stat)
    active_opens: int = 0  # the namespace's TcpActiveOpens: connections made so far


@dataclass(slots=True)
class Run:
    minutes: float
    processes: int
    clients: int
    pairs: int
    seconds: list[Second] = field(default_factory=list)
    namespaces_created: int = 0
    namespaces_deleted: int = 0
    hups: list[float] = field(default_factory=list)


def parse_metrics(text: str, netns: str) -> dict[str, Any]:
    """The few series the soak follows, from one exposition."""
    found: dict[str, Any] = {"sources_down": 0}
    own = f'netns="{netns}"'
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        if name == "tcpwatch_sockets" and own in labels and 'family="ipv4"' in labels:
            if 'state="established"' in labels:
                found["established"] = int(float(value))
        elif name == "tcpwatch_established_dumped" and own in labels:
            found["dumped"] = int(float(value))
        elif name == "tcpwatch_last_poll_timestamp_seconds":
            found["poll_at"] = float(value)
        elif name == "tcpwatch_netns_polled":
            found["namespaces"] = int(float(value))
        elif name == "tcpwatch_source_up" and float(value) == 0:
            found["sources_down"] += 1
    return found


def scrape(namespace: Namespace) -> tuple[bool, float, str, str]:
    """One GET /metrics on a new connection: (ok, seconds, body, error)."""
    started = time.perf_counter()
    try:
        with namespace.connect(("127.0.0.1", PORT), timeout=SCRAPE_TIMEOUT) as sock:
            sock.settimeout(SCRAPE_TIMEOUT)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            chunks: list[bytes] = []
            while time.perf_counter() - started < SCRAPE_TIMEOUT:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            else:
                return False, time.perf_counter() - started, "", "timed out"
    except OSError as error:
        return False, time.perf_counter() - started, "", f"{type(error).__name__}: {error}"
    elapsed = time.perf_counter() - started
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        return False, elapsed, "", status.decode("latin-1")[:80] or "empty response"
    return True, elapsed, body.decode("utf-8", "replace"), ""


def ss_established(namespace: Namespace) -> int | None:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace.name, "ss", "-4", "-tanH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if result.returncode != 0:
        return None
    return sum(1 for line in result.stdout.splitlines() if line.strip())


def process_cpu(pid: int) -> float:
    """user + system seconds of a process, every thread (clock ticks)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_sample(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, threads, open descriptors) of a process."""
    rss = threads = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def active_opens(namespace: Namespace) -> int:
    lines = [
        line.split() for line in namespace.read_net("snmp").splitlines() if line.startswith("Tcp:")
    ]
    return int(lines[1][lines[0].index("ActiveOpens")])


@dataclass(slots=True)
class ExtraNamespaces:
    """Throw-away namespaces beside the main one, each living a few seconds."""

    prefix: str
    alive: list[tuple[Namespace, float]] = field(default_factory=list)  # (namespace, dies at)
    created: int = 0
    deleted: int = 0

    def step(self, now: float) -> None:
        for namespace, dies_at in list(self.alive):
            if now >= dies_at:
                self.alive.remove((namespace, dies_at))
                namespace.delete()
                self.deleted += 1
        if len(self.alive) < MAX_EXTRA_NAMESPACES and secrets.randbelow(3) == 0:
            namespace = Namespace.create(self.prefix)
            self.alive.append((namespace, now + 3 + secrets.randbelow(12)))
            self.created += 1

    def close(self) -> None:
        for namespace, _ in self.alive:
            try:
                namespace.delete()
                self.deleted += 1
            except NamespaceError as error:
                print(f"could not delete {namespace.name}: {error}", file=sys.stderr)
        self.alive.clear()


def wait_line(process: subprocess.Popen[str], expected: str, timeout: float) -> None:
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise NamespaceError(f"no {expected!r} within {timeout:.0f} s")
    line = process.stdout.readline().strip()
    if line != expected:
        raise NamespaceError(f"expected {expected!r}, got {line!r}")


def soak(args: argparse.Namespace, run: Run) -> None:
    main = Namespace.create("tw-soak")
    extra = ExtraNamespaces(f"{main.name}-x")
    children: list[subprocess.Popen[str]] = []
    lifetime = str(args.minutes * 60 + 120)
    descriptor, config = tempfile.mkstemp(suffix=".yml", prefix="tw-soak-")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(f'interval: 1s\nnamespaces: ["{main.name}*"]\n')
        population = main.spawn(
            [sys.executable, "-c", _POPULATION, str(args.pairs), str(POPULATION_PORT), lifetime],
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(population)
        wait_line(population, "ready", 120)
        daemon = main.spawn(
            [
                sys.executable,
                "-m",
                "tcpwatch",
                "serve",
                "--config",
                config,
                "--listen",
                f"127.0.0.1:{PORT}",
                "--log-level",
                "warning",
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(args.daemon_log, "w"),  # noqa: SIM115 - closed with the process
        )
        children.append(daemon)  # type: ignore[arg-type]
        for index in range(args.processes):
            churn = main.spawn(
                [
                    sys.executable,
                    CHURN,
                    "loop",
                    "--port",
                    str(CHURN_PORT + index),
                    "--clients",
                    str(args.clients),
                    "--seconds",
                    lifetime,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(churn)
            wait_line(churn, "churning", 30)
        started = time.monotonic()
        end = started + args.minutes * 60
        deadline = time.monotonic() + 30
        while not scrape(main)[0]:  # the first poll
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise NamespaceError("tcpwatch serve did not answer within 30 s")
            time.sleep(0.5)
        next_hup = started + 60
        next_tick = started
        while (now := time.monotonic()) < end:
            if daemon.poll() is not None:
                raise NamespaceError(f"tcpwatch serve exited with {daemon.returncode}")
            ok, seconds, body, error = scrape(main)
            second = Second(round(now - started, 3), ok, seconds, error)
            if ok:
                for key, value in parse_metrics(body, main.name).items():
                    setattr(second, key, value)
            second.ss_established = ss_established(main)
            second.rss_kib, second.threads, second.fds = process_sample(daemon.pid)
            second.cpu = process_cpu(daemon.pid)
            second.active_opens = active_opens(main)
            run.seconds.append(second)
            if now >= next_hup:
                daemon.send_signal(signal.SIGHUP)
                run.hups.append(now - started)
                next_hup += 60
            extra.step(now)
            next_tick += 1.0
            time.sleep(max(0.0, next_tick - time.monotonic()))
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.kill()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"child {child.pid} did not exit", file=sys.stderr)
        extra.close()
        run.namespaces_created, run.namespaces_deleted = extra.created, extra.deleted
        os.unlink(config)
        main.delete()


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def minutes(run: Run) -> Iterator[tuple[int, list[Second]]]:
    by_minute: dict[int, list[Second]] = {}
    for second in run.seconds:
        by_minute.setdefault(int(second.at // 60), []).append(second)
    yield from sorted(by_minute.items())


def connection_rate(seconds: Sequence[Second]) -> float:
    if len(seconds) < 2:
        return 0.0
    first, last = seconds[0], seconds[-1]
    return (last.active_opens - first.active_opens) / max(last.at - first.at, 1e-9)


def report(run: Run) -> str:
    low = 2 * run.pairs
    high = low + 2 * run.processes * run.clients + WALK_SLACK + 2
    polls: dict[float, Second] = {}
    for second in run.seconds:
        if second.poll_at is not None and second.established is not None:
            polls.setdefault(second.poll_at, second)

    def outside(count: int) -> int:
        return max(low - count, count - high, 0)

    errors = [outside(s.established) for s in polls.values() if s.established is not None]
    ss_errors = [outside(s.ss_established) for s in run.seconds if s.ss_established is not None]
    diffs = [
        s.established - s.ss_established
        for s in run.seconds
        if s.established is not None and s.ss_established is not None
    ]
    failed = [s for s in run.seconds if not s.scrape_ok]
    rate = connection_rate(run.seconds)
    latencies = [s.scrape_seconds for s in run.seconds if s.scrape_ok]
    lines = [
        f"Run: {len(run.seconds)} one-second ticks ({run.minutes:g} minutes), "
        f"{run.processes} churn processes x {run.clients} clients, {run.pairs} long-lived pairs; "
        f"{run.namespaces_created} namespaces created and {run.namespaces_deleted} deleted beside "
        f"the main one; SIGHUP at {', '.join(f'{h:.0f}' for h in run.hups)} s.",
        "",
        f"- Churn: {rate:,.0f} connections/s on average (TcpActiveOpens of the namespace).",
        f"- Scrapes: {len(run.seconds) - len(failed)} ok, **{len(failed)} failed**; latency p50 "
        f"{quantile(latencies, 0.5) * 1000:.1f} ms, p99 {quantile(latencies, 0.99) * 1000:.1f} ms, "
        f"max {max(latencies, default=0) * 1000:.1f} ms.",
        f"- ESTABLISHED band [{low}, {high}]: {len(errors)} distinct polls, "
        f"{sum(1 for e in errors if e)} outside it (error p50 {quantile(errors, 0.5):.0f}, p90 "
        f"{quantile(errors, 0.9):.0f}, p99 {quantile(errors, 0.99):.0f}, max "
        f"{max(errors, default=0)}); polls that fell back to dumping ESTABLISHED: "
        f"{sum(1 for s in polls.values() if s.dumped)}.",
        f"- `ss` right after each scrape: {sum(1 for e in ss_errors if e)} of {len(ss_errors)} "
        f"outside the band (max {max(ss_errors, default=0)}); tcpwatch minus ss (the poll is up to "
        f"1 s older): p50 {quantile(diffs, 0.5):+.0f}, p10 {quantile(diffs, 0.1):+.0f}, p90 "
        f"{quantile(diffs, 0.9):+.0f}, |max| {max((abs(d) for d in diffs), default=0)}.",
        "",
        "| minute | connections/s | RSS MiB (min-max) | threads (max) | fds (max) "
        "| daemon CPU s | scrapes failed | polls outside band | namespaces polled (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous_cpu = 0.0
    for minute, seconds in minutes(run):
        per_second = connection_rate(seconds)
        rss = [s.rss_kib / 1024 for s in seconds]
        minute_polls = {s.poll_at: s for s in seconds if s.poll_at is not None}
        minute_outside = sum(
            1 for s in minute_polls.values() if s.established is not None and outside(s.established)
        )
        cpu, previous_cpu = seconds[-1].cpu - previous_cpu, seconds[-1].cpu
        lines.append(
            f"| {minute + 1} | {per_second:,.0f} | {min(rss):.1f}-{max(rss):.1f} | "
            f"{max(s.threads for s in seconds)} | {max(s.fds for s in seconds)} | {cpu:.1f} | "
            f"{sum(1 for s in seconds if not s.scrape_ok)} | "
            f"{minute_outside} of {len(minute_polls)} | {max(s.namespaces for s in seconds)} |"
        )
    if failed:
        lines += [
            "",
            "Failed scrapes: " + "; ".join(f"{s.at:.0f} s {s.error}" for s in failed[:10]),
        ]
    return "\n".join(lines) + "\n"


def write_between_markers(path: Path, text: str) -> None:
    content = path.read_text()
    start, stop = (content.index(marker) for marker in MARKERS)
    path.write_text(content[: start + len(MARKERS[0])] + "\n" + text + content[stop:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=3, help="churn processes")
    parser.add_argument("--clients", type=int, default=4, help="client threads per process")
    parser.add_argument("--pairs", type=int, default=200, help="long-lived connections")
    parser.add_argument("--output", type=Path, help="write the report between its markers")
    parser.add_argument("--samples", type=Path, help="write every second's sample as JSON")
    parser.add_argument("--daemon-log", default="/dev/null", help="the daemon's stderr")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 120 or not 0 < args.processes <= 8 or not 0 < args.clients <= 16:
        parser.error("bounds: --minutes 0..120, --processes 1..8, --clients 1..16")

    def interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    run = Run(args.minutes, args.processes, args.clients, args.pairs)
    try:
        soak(args, run)
    except (Interrupted, NamespaceError, OSError, subprocess.SubprocessError) as error:
        print(f"soak failed: {type(error).__name__}: {error}", file=sys.stderr)
        if not run.seconds:
            return 2
    text = report(run)
    print(text)
    if args.samples:
        args.samples.write_text(json.dumps([asdict(s) for s in run.seconds]))
    if args.output:
        write_between_markers(args.output, text)
    return 0 if all(s.scrape_ok for s in run.seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
