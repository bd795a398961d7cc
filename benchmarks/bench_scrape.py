"""Scrape latency of `tcpwatch serve` under concurrent load, on loopback, in a throw-away netns.

Run as root from the repository root::

    python benchmarks/bench_scrape.py [--sockets 0,18000,100000] [--requests 500] [--threads 50]

For each socket count: a network namespace (``ip netns add tw-scrape-<random>``) gets that many
ESTABLISHED loopback sockets (a helper process holding both ends of sockets/2 connections), then
``python -m tcpwatch serve --listen 127.0.0.1:PORT --interval 3600`` starts there with
``collect.established: dumped`` (every socket is dumped and parsed, so polls grow with the
population). After its first poll, a load client inside the namespace fires ``--requests``
GET /metrics over ``--threads`` threads, all released at once: once with a new connection per
request, once with one kept-alive connection per thread (as Prometheus scrapes).

It prints, per socket count: status codes, p50/p90/p99/max latency (connect to last body byte),
requests per second, the daemon's CPU seconds over the load, its poll duration, and how many polls
ran during the load (0 expected: scrapes render the cached poll, they never poll).

Everything is bounded (request count, per-request timeout, an overall deadline) and removed in
``finally``: the daemon, the helper and the namespace. Exit status: 0 when every request got a
200 and no scrape polled, 1 otherwise, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PORT = 19477
POPULATION_PORT = 20001
HELPER_LIFETIME = 900.0  # the population helper exits by itself after this
REQUEST_TIMEOUT = 30.0
MAX_PAIRS_PER_HELPER = 9_000  # both ends held: 18,000 fds, under RLIMIT_NOFILE's 20,000


# -- inside the namespace: the population and the load ---------------------------------------------


def hold_population(pairs: int, port: int) -> int:
    """Open ``pairs`` loopback connections (both ends), print ``ready``, hold until killed."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    held: list[socket.socket] = [listener]
    deadline = time.monotonic() + 120
    for _ in range(pairs):
        if time.monotonic() > deadline:
            print("population not built within 120 s", file=sys.stderr)
            return 1
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        server, _ = listener.accept()
        held += [client, server]
    print("ready", flush=True)
    time.sleep(HELPER_LIFETIME)
    return 0


@dataclass(frozen=True, slots=True)
class Result:
    status: int  # 0: the request failed (its error is in `error`)
    seconds: float
    error: str = ""


def _scrape(port: int, connection: http.client.HTTPConnection | None) -> Result:
    """One GET /metrics: on ``connection`` (kept alive) or, if None, on a new connection."""
    started = time.perf_counter()
    own = connection is None
    if connection is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        response = connection.getresponse()
        response.read()
        return Result(response.status, time.perf_counter() - started)
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        return Result(0, time.perf_counter() - started, f"{type(error).__name__}: {error}")
    finally:
        if own:
            connection.close()


def _client_process(
    port: int,
    counts: Sequence[int],
    keep_alive: bool,
    start: Any,  # multiprocessing.synchronize.Barrier shared by every client thread
    out: Any,  # multiprocessing.Queue for this process' results
) -> None:
    results: list[Result] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        kept = (
            http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
            if keep_alive
            else None
        )
        start.wait(timeout=60)
        mine = [_scrape(port, kept) for _ in range(count)]
        if kept is not None:
            kept.close()
        with lock:
            results.extend(mine)

    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in counts]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=REQUEST_TIMEOUT * max(counts, default=0) + 60)
    out.put([(r.status, r.seconds, r.error) for r in results])


def run_load(
    port: int, requests: int, threads: int, keep_alive: bool, processes: int
) -> dict[str, Any]:
    """``requests`` scrapes over ``threads`` threads released together; JSON-ready results.

    The threads are spread over ``processes`` client processes, so the client's own GIL does
    not queue responses that have already arrived. With ``keep_alive`` each thread reuses one
    connection, as Prometheus does between scrapes; without, every request opens a new one.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")
    per_thread = [
        requests // threads + (1 if i < requests % threads else 0) for i in range(threads)
    ]
    processes = max(1, min(processes, threads))
    groups = [per_thread[i::processes] for i in range(processes)]
    start = context.Barrier(threads + 1)
    out = context.Queue()
    clients = [
        context.Process(target=_client_process, args=(port, group, keep_alive, start, out))
        for group in groups
    ]
    for client in clients:
        client.start()
    try:
        start.wait(timeout=60)
        began = time.perf_counter()
        deadline = REQUEST_TIMEOUT * max(per_thread) + 90
        results = [
            Result(status, seconds, error)
            for _ in clients
            for status, seconds, error in out.get(timeout=deadline)
        ]
        wall = time.perf_counter() - began
    finally:
        for client in clients:
            client.join(timeout=10)
            if client.is_alive():
                client.kill()
    latencies = sorted(r.seconds for r in results)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if latencies else []
    return {
        "requests": requests,
        "answered": len(results),
        "statuses": dict(Counter(str(r.status) for r in results)),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "p50": quantiles[49] if quantiles else None,
        "p90": quantiles[89] if quantiles else None,
        "p99": quantiles[98] if quantiles else None,
        "max": latencies[-1] if latencies else None,
        "wall": wall,
    }


# -- the orchestrator (host side) -----------------------------------------------------------------


def _run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=True)


@contextmanager
def namespace() -> Iterator[str]:
    name = f"tw-scrape-{secrets.token_hex(4)}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30, check=False
        ).stdout.split()
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (
                subprocess.run(
                    ["ip", "netns", "del", name], capture_output=True, check=False
                ).returncode
                == 0
            ):
                break
            time.sleep(0.2)


def _in_netns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise ValueError(f"{name} not in the exposition")


def _fetch_metrics(netns: str, port: int) -> str:
    program = (
        "import http.client,sys;c=http.client.HTTPConnection('127.0.0.1',int(sys.argv[1]),"
        "timeout=30);c.request('GET','/metrics');r=c.getresponse();"
        "sys.stdout.write(r.read().decode())"
    )
    return _run(_in_netns(netns, sys.executable, "-c", program, str(port)), timeout=60).stdout


def _wait_ready(netns: str, port: int, daemon: subprocess.Popen[bytes], log: Path) -> None:
    program = (
        "import http.client,sys;c=http.client.HTTPConnection('127.0.0.1',int(sys.argv[1]),"
        "timeout=5);c.request('GET','/-/ready');sys.exit(c.getresponse().status!=200)"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"tcpwatch serve exited {daemon.returncode}: {log.read_text()}")
        probe = subprocess.run(
            _in_netns(netns, sys.executable, "-c", program, str(port)),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"tcpwatch serve not ready within 120 s: {log.read_text()}")


def measure(sockets: int, requests: int, threads: int, processes: int) -> list[dict[str, Any]]:
    pairs = sockets // 2
    with namespace() as netns, tempfile.TemporaryDirectory(prefix="tw-scrape-") as scratch:
        children: list[subprocess.Popen[Any]] = []
        try:
            for index in range(0, pairs, MAX_PAIRS_PER_HELPER):
                count = min(MAX_PAIRS_PER_HELPER, pairs - index)
                helper = subprocess.Popen(
                    _in_netns(
                        netns,
                        sys.executable,
                        __file__,
                        "hold",
                        "--pairs",
                        str(count),
                        "--port",
                        str(POPULATION_PORT + index // MAX_PAIRS_PER_HELPER),
                    ),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                children.append(helper)
                assert helper.stdout is not None
                line = helper.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"population helper said {line!r}")
            config = Path(scratch) / "config.yaml"
            config.write_text("collect:\n  established: dumped\n")
            log = Path(scratch) / "serve.log"
            with open(log, "wb") as log_file:
                daemon = subprocess.Popen(
                    _in_netns(
                        netns,
                        sys.executable,
                        "-m",
                        "tcpwatch",
                        "serve",
                        "--listen",
                        f"127.0.0.1:{PORT}",
                        "--interval",
                        "3600",
                        "--config",
                        str(config),
                    ),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=_env(),
                    cwd=str(REPO_ROOT),
                )
            children.append(daemon)
            _wait_ready(netns, PORT, daemon, log)
            results = []
            for keep_alive in (False, True):
                before = _fetch_metrics(netns, PORT)
                argv = ["load", "--port", str(PORT), "--requests", str(requests)]
                argv += ["--threads", str(threads), "--processes", str(processes)]
                argv += ["--keep-alive"] if keep_alive else []
                load = _run(
                    _in_netns(netns, sys.executable, __file__, *argv),
                    timeout=REQUEST_TIMEOUT * requests / threads + 120,
                )
                after = _fetch_metrics(netns, PORT)
                result: dict[str, Any] = json.loads(load.stdout)
                result["sockets"] = sockets
                result["keep_alive"] = keep_alive
                result["counted"] = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in after.splitlines()
                    if line.startswith("tcpwatch_sockets{")
                )
                result["poll_seconds"] = _metric(after, "tcpwatch_poll_duration_seconds_sum")
                result["polls_during_load"] = _metric(
                    after, "tcpwatch_poll_duration_seconds_count"
                ) - _metric(before, "tcpwatch_poll_duration_seconds_count")
                result["cpu_seconds"] = _metric(after, "process_cpu_seconds_total") - _metric(
                    before, "process_cpu_seconds_total"
                )
                result["exposition_bytes"] = len(after.encode())
                results.append(result)
            return results
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                child.wait(timeout=10)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def report(results: Sequence[dict[str, Any]], requests: int, threads: int, processes: int) -> str:
    lines = [
        f"{requests} GET /metrics over {threads} threads in {processes} client processes on "
        "loopback, gzip accepted; connections: "
        "a new one per request, or one kept alive per thread (as Prometheus does); tcpwatch "
        "serve --interval 3600 (one poll, before the load).",
        "",
        "| sockets in netns | connections | statuses | p50 ms | p90 ms | p99 ms | max ms | req/s | "
        "daemon CPU s | poll s | polls during load | exposition bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(r["statuses"].items()))
        lines.append(
            f"| {r['sockets']:,} (tcpwatch counted {r['counted']:,.0f}) | "
            f"{'kept alive' if r['keep_alive'] else 'new each'} | {statuses} | "
            f"{_ms(r['p50'])} | {_ms(r['p90'])} | {_ms(r['p99'])} | {_ms(r['max'])} | "
            f"{r['answered'] / r['wall']:.0f} | {r['cpu_seconds']:.2f} | {r['poll_seconds']:.3f} | "
            f"{r['polls_during_load']:.0f} | {r['exposition_bytes']:,} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command")
    hold = commands.add_parser("hold", help="(internal) hold a population inside the namespace")
    hold.add_argument("--pairs", type=int, required=True)
    hold.add_argument("--port", type=int, required=True)
    load = commands.add_parser("load", help="(internal) run the load inside the namespace")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--requests", type=int, required=True)
    load.add_argument("--threads", type=int, required=True)
    load.add_argument("--keep-alive", action="store_true")
    load.add_argument("--processes", type=int, required=True)
    parser.add_argument(
        "--sockets", default="0,18000,100000", help="socket counts, comma-separated"
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--threads", type=int, default=50)
    parser.add_argument(
        "--processes", type=int, default=10, help="client processes the threads are spread over"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "hold":
        return hold_population(args.pairs, args.port)
    if args.command == "load":
        result = run_load(args.port, args.requests, args.threads, args.keep_alive, args.processes)
        print(json.dumps(result))
        return 0
    if os.geteuid() != 0:
        print("bench_scrape: run as root (it creates a network namespace)", file=sys.stderr)
        return 2
    if not 1 <= args.threads <= 500 or not 1 <= args.requests <= 100_000:
        print("bench_scrape: --threads 1..500, --requests 1..100000", file=sys.stderr)
        return 2
    try:
        sizes = [int(part) for part in args.sockets.split(",")]
        results = [
            result
            for size in sizes
            for result in measure(size, args.requests, args.threads, args.processes)
        ]
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as error:
        print(f"bench_scrape: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(results, indent=2)
        if args.json
        else report(results, args.requests, args.threads, args.processes)
    )
    ok = all(
        r["statuses"] == {"200": args.requests} and r["polls_during_load"] == 0 for r in results
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
