"""The whole daemon's CPU per socket-destroy event under churn, thread by thread (issue 20 item 3).

Run as root from the repository root::

    python benchmarks/bench_events.py [--before TREE] [--tracepoints on,off] [--seconds 10]
        [--rounds 3] [--clients 4] [--smoke]

Each run starts one tree's ``tcpwatch serve --interval 1`` in a fresh namespace of its own
(namespace.py: entered with setns, so the host's tracefs stays visible and the tracepoints
source is up when ``collect.tracepoints`` is on), waits for its first poll and ``--warmup``
seconds, then reads every thread's CPU (``/proc/PID/task/*/schedstat``, nanoseconds) over
``--seconds`` with nothing moving (idle), and again over ``--seconds`` under ``churn.py loop
--clients N`` in the same namespace. The destroy events are the daemon's own count
(``tcpwatch_lifecycle_events_total``, every label) read at the churning window's ends, on one
keep-alive connection (so the idle window is bracketed by the same two scrapes). Per event:
(churning - idle CPU per second) / destroy events per second, for the whole daemon and per
thread. Threads are named by the system call they were caught waiting in (sampled five times a
second): the gathering thread (destroy reader, tracepoints) waits in epoll_wait, the poll thread
in futex, the web server in poll; ``main`` is the process' first thread.

``--before TREE`` measures another tcpwatch tree in the same run (e.g. ``git archive main | tar
-x -C DIR``); the trees take turns within each round, for each tracepoints setting, so a change
in the machine's load falls on both. Each tree is byte-compiled first (``compileall``), as the
package's postinst does, so a run reads bytecode even under ``PYTHONDONTWRITEBYTECODE``. The load
average is printed beside each run: on a shared machine it moves the figures more than most
changes do.

``--smoke`` is a seconds-long run that only shows the benchmark still works (CI runs it:
tests/integration/test_benchmarks_smoke.py); its figures mean nothing.

Every run is bounded in time; the daemon, the churn and the namespace are removed in ``finally``
blocks (children also die with the benchmark: PR_SET_PDEATHSIG). Exit status: 0, or 2 when the
run failed or was interrupted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench_poll import (
    BenchError,
    NamespaceHTTPConnection,
    interrupts_as_keyboard,
    log,
    parse_exposition,
    signals_held,
)
from bench_serve import stop_daemon, tcpwatch_env
from namespace import Namespace, NamespaceError

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(HERE)
PORT = 9477
CHURN_PORT = 7100
START_SECONDS = 60  # the first poll must come within this
# The system call a thread waits in (x86_64 and aarch64 numbers) -> its name.
WAITS = {
    "232": "gather",  # epoll_wait (x86_64)
    "281": "gather",  # epoll_pwait
    "22": "gather",  # epoll_pwait (aarch64)
    "202": "poll",  # futex (x86_64)
    "98": "poll",  # futex (aarch64)
    "7": "web",  # poll (x86_64): the web server's selector
    "73": "web",  # ppoll (aarch64)
}
THREADS = ("gather", "poll", "web", "main", "other")


@dataclass(slots=True)
class Run:
    tree: str
    tracepoints: bool
    load: str
    events: float  # destroy events a second under churn
    records: float  # tracepoint records a second (every namespace's)
    time_wait: int  # the namespace's TIME_WAIT sockets at the churning window's end
    idle_ms: dict[str, float] = field(default_factory=dict)  # thread -> ms of CPU a second
    busy_ms: dict[str, float] = field(default_factory=dict)

    def per_event(self, thread: str | None = None) -> float:
        """us of CPU per destroy event, churning minus idle (``None``: the whole daemon)."""
        names = THREADS if thread is None else (thread,)
        extra = sum(self.busy_ms.get(n, 0.0) - self.idle_ms.get(n, 0.0) for n in names)
        return extra * 1e3 / self.events if self.events > 0 else float("nan")


def load() -> str:
    with open("/proc/loadavg", encoding="ascii") as file:
        return file.read().split()[0]


def thread_cpu(pid: int) -> dict[int, int]:
    """ns of CPU of each live thread of ``pid`` so far."""
    cpu: dict[int, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as file:
            cpu[int(task)] = int(file.read().split()[0])
    return cpu


class Daemon:
    """One tree's ``serve --interval 1`` in ``namespace``, read over one keep-alive connection."""

    def __init__(self, namespace: Namespace, tree: str, tracepoints: bool, workdir: str) -> None:
        self.namespace = namespace
        config = os.path.join(workdir, "config.yaml")
        with open(config, "w", encoding="ascii") as file:
            file.write(f"collect:\n  tracepoints: {'true' if tracepoints else 'false'}\n")
        self.log_path = os.path.join(workdir, "serve.log")
        argv = [sys.executable, "-m", "tcpwatch", "serve", "--interval", "1", "--config", config]
        argv += ["--listen", f"127.0.0.1:{PORT}", "--log.level", "warning"]
        with open(self.log_path, "wb") as log_file:
            self.process = namespace.spawn(
                argv, stdout=log_file, stderr=subprocess.STDOUT, env=tcpwatch_env(tree), cwd=tree
            )
        self.connection = NamespaceHTTPConnection(namespace, "127.0.0.1", PORT, 30)
        self.waits: dict[int, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )

    def samples(self) -> dict[str, float]:
        try:
            return self._samples()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            return self._samples()

    def _samples(self) -> dict[str, float]:
        self.connection.request("GET", "/metrics", headers={"Accept-Encoding": "identity"})
        response = self.connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise BenchError(f"tcpwatch serve answered {response.status}")
        return parse_exposition(body)

    def counts(self) -> tuple[float, float]:
        """(destroy events, tracepoint records) read so far."""
        totals: dict[str, float] = collections.defaultdict(float)
        for key, value in self.samples().items():
            totals[key.split("{", 1)[0]] += value
        return totals["tcpwatch_lifecycle_events_total"], totals[
            "tcpwatch_tracepoint_records_total"
        ]

    def wait_first_poll(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                with open(self.log_path, "rb") as file:
                    tail = file.read()[-400:].decode(errors="replace")
                raise BenchError(f"tcpwatch serve exited at start: {tail}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.samples().get("tcpwatch_poll_duration_seconds_count", 0) >= 1:
                    return
            self.connection.close()
            if time.monotonic() > deadline:
                raise BenchError(f"tcpwatch serve made no poll within {START_SECONDS} s")
            time.sleep(0.2)

    def window(self, seconds: float) -> tuple[dict[int, int], float, tuple[float, float]]:
        """Each thread's CPU (ns) over ``seconds``, the window's length, and the (events,
        records) counted meanwhile; the threads' waits sampled five times a second."""
        pid = self.process.pid
        start_counts = self.counts()
        before, started = thread_cpu(pid), time.monotonic()
        deadline = started + seconds
        while (now := time.monotonic()) < deadline:
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/syscall") as f:
                    call = f.read().split(maxsplit=1)[0]
                    if call != "running":
                        self.waits[int(task)][call] += 1
            time.sleep(min(0.2, max(0.0, deadline - now)))
        after, span = thread_cpu(pid), time.monotonic() - started
        end_counts = self.counts()
        used = {tid: ns - before.get(tid, 0) for tid, ns in after.items()}
        moved = (end_counts[0] - start_counts[0], end_counts[1] - start_counts[1])
        return used, span, moved

    def name(self, tid: int) -> str:
        if tid == self.process.pid:
            return "main"
        common = self.waits[tid].most_common(1)
        return WAITS.get(common[0][0], "other") if common else "other"

    def by_thread(self, used: dict[int, int], span: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, ns in used.items():
            name = self.name(tid)
            out[name] = out.get(name, 0.0) + ns / 1e6 / span
        return out

    def stop(self) -> None:
        stop_daemon(self.process, self.connection)


def time_wait(namespace: Namespace) -> int:
    for line in namespace.read_net("sockstat").splitlines():
        if line.startswith("TCP:"):
            words = line.split()
            return int(words[words.index("tw") + 1])
    return 0


def measure(tree: str, tracepoints: bool, args: argparse.Namespace) -> Run:
    namespace = Namespace.create("tw-bevents")
    daemon: Daemon | None = None
    churn: subprocess.Popen[str] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="tw-bevents-") as workdir:
            daemon = Daemon(namespace, tree, tracepoints, workdir)
            daemon.wait_first_poll()
            time.sleep(args.warmup)
            load_before = load()
            idle, idle_span, _ = daemon.window(args.seconds)
            churn_argv = [sys.executable, os.path.join(HERE, "churn.py"), "loop"]
            churn_argv += ["--port", str(CHURN_PORT), "--clients", str(args.clients)]
            churn_argv += ["--seconds", str(args.seconds + 15)]
            churn = namespace.spawn(churn_argv, stdout=subprocess.PIPE, text=True)
            assert churn.stdout is not None
            if churn.stdout.readline().strip() != "churning":
                raise BenchError("the churn generator did not start")
            time.sleep(1)
            busy, busy_span, (events, records) = daemon.window(args.seconds)
            waiting = time_wait(namespace)
            run = Run(
                tree,
                tracepoints,
                f"{load_before}-{load()}",
                events / busy_span,
                records / busy_span,
                waiting,
                daemon.by_thread(idle, idle_span),
                daemon.by_thread(busy, busy_span),
            )
            if run.events <= 0:
                raise BenchError("the daemon counted no destroy event under churn")
            return run
    finally:
        with signals_held():
            if churn is not None:
                churn.kill()
                churn.wait(10)
            if daemon is not None:
                daemon.stop()
            with contextlib.suppress(NamespaceError):
                namespace.delete()


def label(tree: str) -> str:
    head = subprocess.run(
        ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0 and os.path.realpath(tree) != os.path.realpath(REPOSITORY):
        return head.stdout.strip()
    if head.returncode == 0:
        return f"this tree ({head.stdout.strip()})"
    return os.path.basename(os.path.normpath(tree))


def row(run: Run, name: str) -> str:
    cells = [name, "on" if run.tracepoints else "off", run.load, f"{run.events:,.0f}"]
    cells += [f"{run.records:,.0f}", f"{run.time_wait:,}"]
    cells += [f"{sum(run.idle_ms.values()):.1f}", f"{sum(run.busy_ms.values()):.1f}"]
    cells += [f"{run.per_event(thread):.2f}" for thread in ("gather", "poll")]
    cells += [f"{run.per_event('web') + run.per_event('main') + run.per_event('other'):.2f}"]
    cells += [f"**{run.per_event():.2f}**"]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| tree | tracepoints | load | destroy events/s | records/s | TIME_WAIT | ms/s idle | "
    "ms/s churning | gather us/event | poll us/event | others us/event | whole daemon us/event |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="another tcpwatch tree, measured in turn with this one")
    parser.add_argument("--tracepoints", default="on,off", help="on, off or on,off")
    parser.add_argument("--seconds", type=float, default=10.0, help="each window (idle, churn)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="churn.py loop's clients")
    parser.add_argument("--warmup", type=float, default=3.0, help="after the first poll")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    modes = args.tracepoints.split(",")
    if not modes or any(mode not in ("on", "off") for mode in modes):
        parser.error("--tracepoints: on, off or on,off")
    args.modes = [mode == "on" for mode in modes]
    if args.smoke:
        args.seconds, args.rounds, args.clients, args.warmup = 2.0, 1, 2, 1.0
    if not (1 <= args.seconds <= 50 and 1 <= args.rounds <= 20 and 1 <= args.clients <= 16):
        parser.error("--seconds 1-50 (TIME_WAIT lives 60 s), --rounds 1-20, --clients 1-16")
    args.trees = [os.path.abspath(tree) for tree in ([args.before] if args.before else [])]
    args.trees.append(REPOSITORY)
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    runs: list[Run] = []
    names = {tree: label(tree) for tree in args.trees}
    try:
        for tree in args.trees:  # as the .deb's postinst does: a user's run reads bytecode
            compiled = [sys.executable, "-m", "compileall", "-q", os.path.join(tree, "tcpwatch")]
            subprocess.run(compiled, check=True, stdout=subprocess.DEVNULL, timeout=300)
        print(f"python benchmarks/bench_events.py {' '.join(argv)}".strip())
        print(f"\n{HEADER}", flush=True)
        with interrupts_as_keyboard():
            for _ in range(args.rounds):
                for tracepoints in args.modes:
                    for tree in args.trees:
                        run = measure(tree, tracepoints, args)
                        runs.append(run)
                        print(row(run, names[tree]), flush=True)
    except KeyboardInterrupt:
        log("interrupted; everything made was removed")
        return 2
    except (BenchError, NamespaceError, OSError, subprocess.SubprocessError) as error:
        log(f"bench_events: {error}")
        return 2
    print("\n| tree | tracepoints | runs | whole daemon us/event: median | gather | poll |")
    print("|---|---|---:|---:|---:|---:|")
    for tracepoints in args.modes:
        for tree in args.trees:
            mine = [r for r in runs if r.tree == tree and r.tracepoints == tracepoints]
            medians = [
                statistics.median(r.per_event(thread) for r in mine)
                for thread in (None, "gather", "poll")
            ]
            print(
                f"| {names[tree]} | {'on' if tracepoints else 'off'} | {len(mine)} | "
                f"**{medians[0]:.2f}** | {medians[1]:.2f} | {medians[2]:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
