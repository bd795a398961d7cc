"""Cost of polling many network namespaces: 1, 10 and 100 namespaces holding the same sockets.

Run as root from the repository root (the machine should be otherwise quiet)::

    python benchmarks/bench_netns.py [--total 20000] [--counts 1,10,100] [--polls 5]
        [--hashes shared,own] [--idle 100] [--output docs/performance.md]

For each namespace count N and each hash mode, one run:

* N throw-away namespaces ``bnn-<run>-NNN`` (``ip netns add``, lo up). With ``own``, they are
  made from inside a throw-away parent namespace whose ``net.ipv4.tcp_child_ehash_entries`` was
  set first, so each child gets its own established hash (checked: its ``tcp_ehash_entries``
  reads positive); with ``shared`` they use the host's one hash, like every container today.
* One helper process (this file, ``helper`` mode) enters each namespace with setns() and makes
  ``total / 2 / N`` ESTABLISHED sockets (both ends of loopback connections) and then
  ``total / 2 / N`` TIME_WAIT sockets there, so every N holds the same ``total`` sockets.
* This process polls them as ``tcpwatch --netns 'bnn-<run>-*'`` would: ``poll(CollectSettings(),
  (pattern,))``, after a warm-up, ``--polls`` times with the default settings and ``--polls``
  times without process attribution. Between scans it polls through serve's own poller
  (``pipeline.SnapshotTaker`` on a clock the benchmark moves): one destination scan, then the
  two polls serve makes before the next one, given what serve gives them (each namespace's
  earlier table and snapshot, the owners found before, the file memo); for those it counts the
  namespaces judged unmoved (only their listeners dumped). CPU is getrusage(RUSAGE_SELF)
  around each poll: user time is tcpwatch's Python, system time is mostly the kernel walking
  socket hashes for sock_diag and producing /proc files. Every poll is checked: each
  namespace's counts must be exactly what the helper made (a TIME_WAIT socket lives 60 s, so a
  run takes only the polls that fit).
* ``empty walk``: one sock_diag dump whose state mask matches no socket, issued from inside one
  of the namespaces (the thread's CPU clock): the kernel walks every bucket of the hash that
  namespace uses and every socket in it, and copies nothing out. It is the floor of one dump.

``--idle N`` adds a run with N namespaces holding no socket at all (sockstat spares every dump).

Everything made (namespaces, the parent, the helper) is removed in ``finally`` blocks, on errors
and SIGINT/SIGTERM too; the helper also dies with this process (PR_SET_PDEATHSIG) and exits by
itself after HELPER_SECONDS. Nothing outside the namespaces it makes is changed. Exit status: 0
when every check matched, 1 when a count differed, 2 when a run failed (a run that cannot be
measured, e.g. one whose polls do not fit before its TIME_WAIT sockets expire on a host busy
with other sockets, is named under the table and the others are still reported).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import resource
import secrets
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

from tcpwatch.config import CollectSettings, Config  # noqa: E402
from tcpwatch.model import Snapshot  # noqa: E402
from tcpwatch.pipeline import SnapshotTaker  # noqa: E402
from tcpwatch.snapshot import poll  # noqa: E402
from tcpwatch.sources import netlink, sockdiag, sockets  # noqa: E402
from tcpwatch.sources import netns as netns_source  # noqa: E402

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
RUN_NETNS = "/run/netns"
PORT = 18080  # below ip_local_port_range: the listener of each namespace
TIME_WAIT_SECONDS = 60.0  # TCP_TIMEWAIT_LEN
WINDOW_MARGIN = 5.0  # a run must finish this long before its first TIME_WAIT socket expires
HELPER_SECONDS = 600.0  # the helper's own lifetime cap
BUILD_SECONDS = 120.0  # the helper must report ready within this
COMMAND_TIMEOUT = 30.0
MAX_NAMESPACES = 200
MAX_TOTAL = 30_000  # sockets; ESTABLISHED pairs hold two fds each in one helper
EMPTY_WALKS = 50
NO_STATE_MASK = 1  # bit 0: no TCP state is numbered 0, so no socket matches
MARKER_BEGIN = "<!-- netns-benchmark:begin -->"
MARKER_END = "<!-- netns-benchmark:end -->"
SLAB_CACHES = ("TCP", "TCPv6", "tw_sock_TCP", "tw_sock_TCPv6", "request_sock_TCP")


class BenchError(Exception):
    """The run could not be made or measured (exit 2)."""


# -- namespaces -----------------------------------------------------------------------------------


def run(argv: Sequence[str]) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)!r} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def read_sysctl(namespace: str, name: str) -> int:
    path = "/proc/sys/" + name.replace(".", "/")
    return int(run(["ip", "netns", "exec", namespace, "cat", path]).split()[0])


def next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 1).bit_length()


@dataclass
class Namespaces:
    """N namespaces for one run, and the parent they were made from (``own`` hash mode)."""

    prefix: str
    count: int
    child_ehash: int = 0  # 0: the host's shared hash
    names: list[str] = field(default_factory=list)
    parent: str | None = None

    @property
    def pattern(self) -> str:
        return f"{self.prefix}-*"

    def create(self) -> None:
        creator: list[str] = []
        if self.child_ehash:
            self.parent = f"{self.prefix}p"  # does not match the pattern
            run(["ip", "netns", "add", self.parent])
            host_before = read_host_sysctl("net.ipv4.tcp_child_ehash_entries")
            run(
                [
                    "ip", "netns", "exec", self.parent, "sysctl", "-q", "-w",
                    f"net.ipv4.tcp_child_ehash_entries={self.child_ehash}",
                ]
            )  # fmt: skip
            if read_host_sysctl("net.ipv4.tcp_child_ehash_entries") != host_before:
                raise BenchError("tcp_child_ehash_entries changed the host's value")
            # nsenter changes only the network namespace, so ip's bind mount lands in ours.
            creator = ["nsenter", f"--net={RUN_NETNS}/{self.parent}", "--"]
        for index in range(self.count):
            name = f"{self.prefix}-{index:03d}"
            run([*creator, "ip", "netns", "add", name])
            self.names.append(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        expected = self.child_ehash or -1
        for name in (self.names[0], self.names[-1]):
            entries = read_sysctl(name, "net.ipv4.tcp_ehash_entries")
            if (entries > 0) != (expected > 0) or (expected > 0 and entries != expected):
                raise BenchError(f"{name}: tcp_ehash_entries is {entries}, wanted {expected}")

    def delete(self) -> list[str]:
        problems = []
        for name in [*self.names, *([self.parent] if self.parent else [])]:
            done = subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, text=True, timeout=60
            )
            if done.returncode != 0:
                problems.append(f"ip netns del {name}: {done.stderr.strip()}")
        self.names.clear()
        self.parent = None
        return problems


def read_host_sysctl(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as handle:
        return handle.read().strip()


# -- the helper that holds the sockets ------------------------------------------------------------


def setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(descriptor, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {os.strerror(code)}")
    finally:
        os.close(descriptor)


def sockstat_time_wait() -> int:
    """TIME_WAIT sockets of the namespace this (single-threaded) process is in."""
    with open("/proc/self/net/sockstat", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    raise OSError("no TCP line in /proc/self/net/sockstat")


def helper(spec: dict[str, Any]) -> int:
    """Make the sockets of every namespace in ``spec``; print ``ready``; hold them until EOF."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    paths: list[str] = spec["paths"]
    pairs: int = spec["pairs"]
    time_wait: int = spec["time_wait"]
    deadline = time.monotonic() + BUILD_SECONDS
    held: list[socket.socket] = []
    listeners: list[socket.socket] = []
    home = os.stat("/proc/thread-self/ns/net").st_ino
    for path in paths:
        setns(path)
        if os.stat("/proc/thread-self/ns/net").st_ino in (home, netns_source.NET_NS_INIT_INO):
            raise OSError(f"setns({path}) left us in the host's namespace")
        # Our namespace's own copy: loopback's default (2) lets a connect() made a second later
        # take over a TIME_WAIT port, and the TIME_WAIT count would never settle.
        with open("/proc/sys/net/ipv4/tcp_tw_reuse", "w", encoding="ascii") as reuse:
            reuse.write("0")
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", PORT))
        listener.listen(4096)
        listeners.append(listener)
        for _ in range(pairs):
            client = socket.create_connection(("127.0.0.1", PORT), timeout=10)
            server, _ = listener.accept()
            held += (client, server)
    started = time.time()  # TIME_WAIT made from here on: the run's clock starts
    for path, listener in zip(paths, listeners, strict=True):
        setns(path)
        for _ in range(time_wait):
            client = socket.create_connection(("127.0.0.1", PORT), timeout=10)
            server, _ = listener.accept()
            client.close()  # the side that closes first keeps TIME_WAIT
            server.close()
        while (seen := sockstat_time_wait()) != time_wait:
            if time.monotonic() > deadline:
                raise OSError(f"{path}: {seen} TIME_WAIT sockets, made {time_wait}")
            time.sleep(0.01)
    print(json.dumps({"ready": True, "time_wait_since": started, "fds": len(held)}), flush=True)
    end = time.monotonic() + HELPER_SECONDS
    while (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select([sys.stdin], [], [], min(left, 10.0))
        if readable and not sys.stdin.read(1):
            break  # EOF: the benchmark is done with us
    return 0


def die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def holding(paths: list[str], pairs: int, time_wait: int) -> Iterator[float]:
    """The helper, ready; yields the wall time its first TIME_WAIT socket was made."""
    spec = json.dumps({"paths": paths, "pairs": pairs, "time_wait": time_wait})
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "helper", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent,  # safe: no thread of this process is running yet
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], BUILD_SECONDS + 10)
        line = process.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"helper did not get ready (exit {process.poll()})")
        yield float(json.loads(line)["time_wait_since"])
    finally:
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# -- measuring --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PollCost:
    user: float
    system: float
    wall: float
    dumps: int
    messages: int
    unmoved: int  # namespaces whose table was kept, only their listeners dumped
    namespaces: int


@dataclass(frozen=True, slots=True)
class RunResult:
    namespaces: int
    sockets_each: int
    hash_mode: str
    ehash_entries: int  # buckets each namespace's dumps walk
    host_sockets: int  # TCP objects host-wide (slabinfo) while measuring: the shared hash's load
    default: tuple[PollCost, ...]
    no_attribution: tuple[PollCost, ...]
    steady: tuple[PollCost, ...]  # serve's polls between destination scans (SnapshotTaker)
    empty_walk_seconds: float  # system time of one dump that matches nothing
    load: str


def counting_dumps() -> tuple[list[int], Callable[[], None]]:
    """Wrap netlink.build_request to count sock_diag dumps (every source's: the state dump,
    the per-destination and the listeners' scans); returns the counter and the undo function."""
    counter = [0]
    original = netlink.build_request

    def counted(*args: Any, **kwargs: Any) -> bytes:
        counter[0] += 1
        return original(*args, **kwargs)

    netlink.build_request = counted

    def undo() -> None:
        netlink.build_request = original

    return counter, undo


def measure_poll(
    settings: CollectSettings,
    pattern: str,
    check: Callable[[tuple[Snapshot, ...]], None],
    taker: Callable[[], tuple[Snapshot, ...]] | None = None,
) -> PollCost:
    """One fresh poll (a destination scan, as `check` polls), or one of ``taker``'s."""
    counter, undo = counting_dumps()
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        snapshots = taker() if taker is not None else poll(settings, (pattern,))
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        undo()
    check(snapshots)
    messages = sum(s.sockets.messages for s in snapshots if s.sockets is not None)
    return PollCost(
        user=after.ru_utime - before.ru_utime,
        system=after.ru_stime - before.ru_stime,
        wall=wall,
        dumps=counter[0],
        messages=messages,
        unmoved=sum(1 for s in snapshots if s.sockets is not None and s.sockets.unchanged),
        namespaces=len(snapshots),
    )


class ServePoller:
    """serve's poller (pipeline.SnapshotTaker, which keeps the earlier tables and snapshots, the
    owners found and the file memo between polls), on a clock this benchmark moves: ``scan``
    makes the next poll a destination scan, ``between`` one of the polls before the next."""

    def __init__(self, settings: CollectSettings, pattern: str) -> None:
        self.now = 0.0
        self.config = Config(namespaces=(pattern,), collect=settings)
        self.taker = SnapshotTaker(clock=lambda: self.now)
        self.interval = settings.destinations_interval

    def scan(self) -> tuple[Snapshot, ...]:
        self.now += self.interval
        return tuple(self.taker(self.config))

    def between(self) -> tuple[Snapshot, ...]:
        self.now += 1.0
        return tuple(self.taker(self.config))


def empty_walk_seconds(path: str, walks: int = EMPTY_WALKS) -> float:
    """CPU time of one sock_diag dump that matches no socket, issued from inside ``path``.

    Nearly all of it is the kernel's walk (a request, one DONE message back); the thread's CPU
    clock is exact, where its user/system split would be sampled per tick.
    """
    target = netns_source.NetnsTarget(name="bench", inode=os.stat(path).st_ino, path=path)

    def walk() -> float:
        aggregator = sockdiag.DumpAggregator(None, ())
        buffer = memoryview(bytearray(1 << 16))
        with contextlib.closing(netlink.open_socket()) as sock:
            before = time.thread_time()
            for sequence in range(1, walks + 1):
                request = netlink.build_request("ipv4", NO_STATE_MASK, b"", sequence)
                sockets.run_dump(sock.send, sock.recv_into, request, "ipv4", aggregator, buffer)
            return (time.thread_time() - before) / walks

    return netns_source.run_inside(target, walk)


def host_tcp_objects() -> int:
    """Active TCP socket objects host-wide, every namespace included (/proc/slabinfo)."""
    total = 0
    with open("/proc/slabinfo", encoding="ascii") as handle:
        for line in handle:
            words = line.split()
            if words and words[0] in SLAB_CACHES:
                total += int(words[1])
    return total


def expected_counts(
    pairs: int, time_wait: int, listeners: int
) -> Callable[[tuple[Snapshot, ...]], None]:
    def check(snapshots: tuple[Snapshot, ...]) -> None:
        for snapshot in snapshots:
            table = snapshot.sockets
            if table is None:
                raise CountMismatch(f"{snapshot.netns}: no socket table: {snapshot.sources}")
            seen = (table.total("established"), table.total("time_wait"), table.total("listen"))
            wanted = (2 * pairs, time_wait, listeners)
            if seen != wanted:
                raise CountMismatch(
                    f"{snapshot.netns}: established/time_wait/listen {seen}, made {wanted}"
                )

    return check


class CountMismatch(Exception):
    """tcpwatch counted something other than what the helper made (exit 1)."""


def measure_run(count: int, total: int, hash_mode: str, polls: int, prefix: str) -> RunResult:
    sockets_each = total // count
    pairs, time_wait = sockets_each // 4, sockets_each // 2  # half ESTABLISHED, half TIME_WAIT
    # Own hash: room for every socket at load <= 0.5, and tcp_max_tw_buckets (= buckets / 2)
    # above the TIME_WAIT made.
    child_ehash = max(1024, next_power_of_two(2 * sockets_each)) if hash_mode == "own" else 0
    namespaces = Namespaces(prefix, count, child_ehash)
    try:
        namespaces.create()
        paths = [os.path.join(RUN_NETNS, name) for name in namespaces.names]
        exact = expected_counts(pairs, time_wait, 1 if sockets_each else 0)
        with (
            holding(paths, pairs, time_wait)
            if sockets_each
            else contextlib.nullcontext(time.time()) as since
        ):
            window_end = since + TIME_WAIT_SECONDS - WINDOW_MARGIN

            def fits(seconds: float) -> bool:
                return not sockets_each or time.time() + seconds < window_end

            def check(snapshots: tuple[Snapshot, ...]) -> None:
                try:
                    exact(snapshots)
                except CountMismatch as error:
                    if sockets_each and time.time() > since + TIME_WAIT_SECONDS - 1:
                        # The poll outlasted the first TIME_WAIT sockets (a busy host): they
                        # expired, as ss would show too; the run, not tcpwatch, is at fault.
                        outlasted = f"a poll outlasted the TIME_WAIT sockets: {error}"
                        raise BenchError(outlasted) from error
                    raise

            walk = empty_walk_seconds(paths[0])
            host_sockets = host_tcp_objects()
            warm_up = measure_poll(CollectSettings(), namespaces.pattern, check)
            default: list[PollCost] = []
            bare: list[PollCost] = []
            steady: list[PollCost] = []
            quiet = CollectSettings(process_attribution=False)
            serve = ServePoller(CollectSettings(), namespaces.pattern)
            measure_poll(CollectSettings(), namespaces.pattern, check, serve.scan)  # its owners
            # As many rounds as the TIME_WAIT sockets outlive (up to `polls` of each setting);
            # a round is three scan polls and two cheap ones: timed by the last one, or guessed.
            # Every poll is checked, so a socket expiring inside one fails the run (check).
            round_seconds = 3.5 * warm_up.wall
            for _ in range(polls):
                if not fits(1.2 * round_seconds):
                    break
                round_started = time.monotonic()
                default.append(measure_poll(CollectSettings(), namespaces.pattern, check))
                bare.append(measure_poll(quiet, namespaces.pattern, check))
                # serve: a destination scan, then both polls it makes before the next one.
                measure_poll(CollectSettings(), namespaces.pattern, check, serve.scan)
                for _ in range(2):
                    steady.append(
                        measure_poll(CollectSettings(), namespaces.pattern, check, serve.between)
                    )
                round_seconds = time.monotonic() - round_started
            if not default:
                raise BenchError(
                    f"{count} namespaces: one poll takes {warm_up.wall:.1f} s, too long to fit "
                    "before the TIME_WAIT sockets expire (is the machine busy?)"
                )
        ehash = child_ehash or abs(read_sysctl(namespaces.names[0], "net.ipv4.tcp_ehash_entries"))
        with open("/proc/loadavg", encoding="ascii") as handle:
            load = " ".join(handle.read().split()[:3])
        return RunResult(
            namespaces=count,
            sockets_each=sockets_each and 2 * pairs + time_wait,
            hash_mode=hash_mode,
            ehash_entries=ehash,
            host_sockets=host_sockets,
            default=tuple(default),
            no_attribution=tuple(bare),
            steady=tuple(steady),
            empty_walk_seconds=walk,
            load=load,
        )
    finally:
        for problem in namespaces.delete():
            log(problem)


# -- report -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def per_poll(costs: Sequence[PollCost]) -> float:
    """Median CPU seconds (user + system) of one poll."""
    return median([c.user + c.system for c in costs])


def system_share(costs: Sequence[PollCost]) -> float:
    """System time's share of CPU over all polls together: the kernel samples the split per
    tick, so one short poll's split means little, while the total is exact."""
    total = sum(c.user + c.system for c in costs)
    return sum(c.system for c in costs) / total if total else math.nan


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds >= 0.0001 or seconds == 0 else f"{seconds * 1000:.3f}"


def render(results: Sequence[RunResult], total: int, polls: int, failed: Sequence[str] = ()) -> str:
    kernel = platform.release()
    cpus = os.cpu_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Polling many network namespaces",
        "",
        "What `--netns` costs as the namespaces multiply while the sockets stay the same, and what "
        "a per-namespace established hash (`net.ipv4.tcp_child_ehash_entries`) changes. "
        "Background, and what to do about it: [namespaces.md](namespaces.md#cost). This section "
        "is written by `python benchmarks/bench_netns.py --output docs/performance.md`.",
        "",
        "How to read it: every sock_diag dump walks every bucket of the hash its namespace uses "
        "and every socket in that hash, whichever namespace the socket belongs to. With the "
        "*shared* hash (the default: every namespace uses the host's), a dump costs about one "
        "*empty walk* over the whole host however few sockets the namespace has, so *dumps per "
        "poll* x *empty walk* is the floor of a poll's system time. With an *own* hash "
        "(namespaces created after `tcp_child_ehash_entries` was set where they were created), "
        "a dump walks only that namespace's table. The *idle* row (no socket at all) is the "
        "fixed cost of a namespace: discovery, a thread and setns(), its /proc/net and "
        "/proc/sys/net files; sockstat shows there is nothing to dump.",
        "",
        "### Measured",
        "",
        f"{now}, Linux {kernel}, {cpus} CPUs, `python benchmarks/bench_netns.py` (up to {polls} "
        "polls per setting after a warm-up, as many as the TIME_WAIT sockets outlive; median). "
        f"Each run spreads {total:,} sockets evenly over its namespaces, half ESTABLISHED (both "
        "ends of loopback connections) and half TIME_WAIT, plus one listener per namespace, and "
        "polls them with `poll(CollectSettings(), ('bnn-<run>-*',))`, which is what `tcpwatch "
        "--netns 'bnn-<run>-*'` does. Columns:",
        "",
        "* *CPU per poll*: getrusage of the polling process around `poll()`, user + system, "
        "process attribution (the /proc/*/fd scan) on, the default; *no attribution*: the same "
        "with `process_attribution: false`. A fresh `poll()` is a destination-scan poll: besides "
        "the state dump it runs the per-destination and the listeners' `tcp_info` scans, more "
        "walks of the hash per namespace, which `serve` runs once per `destinations_interval` "
        "(60 s). *dumps per poll* counts every sock_diag request of the poll, all sources.",
        "* *between scans*: a poll of `serve`'s own poller (`pipeline.SnapshotTaker`: each "
        "namespace's earlier table and snapshot, the owners found before, the file memo) "
        "between two destination scans; both polls after each scan are measured. *unmoved*: "
        "the namespaces those polls found unmoved (the same Tcp MIB, sockstat `inuse` and `tw` "
        "as when their table was taken), which dump only their listeners and keep the rest of "
        "the table; *dumps between*: the sock_diag dumps of such a poll, all namespaces.",
        "* *sys*: the kernel's share of that CPU over all polls of the run (sock_diag hash walks, "
        "/proc files, setns threads); the rest is tcpwatch's Python.",
        "* *empty walk*: CPU time of one sock_diag dump that matches no socket, sent from "
        "inside a polled namespace: the kernel's walk of the hash that namespace uses, the floor "
        "under every dump.",
        "* *host TCP objects*: every TCP socket on the machine during the run, all namespaces "
        "(/proc/slabinfo: full, TIME_WAIT and request sockets), the load a shared-hash walk "
        "steps over.",
        "",
        "| namespaces | sockets each | hash (buckets) | dumps per poll | CPU per poll, ms | sys "
        "| no attribution, ms | between scans, ms | unmoved | dumps between "
        "| per namespace, ms | empty walk, ms | host TCP objects | polls |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        cost = per_poll(result.default)
        sockets = f"{result.sockets_each:,}" if result.sockets_each else "0 (idle)"
        lines.append(
            f"| {result.namespaces} | {sockets} | {result.hash_mode} "
            f"({result.ehash_entries:,}) | {median([c.dumps for c in result.default]):g} | "
            f"{milliseconds(cost)} | {system_share(result.default):.0%} | "
            f"{milliseconds(per_poll(result.no_attribution))} | "
            f"{milliseconds(per_poll(result.steady))} | "
            f"{sum(c.unmoved for c in result.steady)}/"
            f"{sum(c.namespaces for c in result.steady)} | "
            f"{median([c.dumps for c in result.steady]):g} | "
            f"{milliseconds(cost / result.namespaces)} | "
            f"{milliseconds(result.empty_walk_seconds)} | {result.host_sockets:,} | "
            f"{len(result.default)} |"
        )
    loads = sorted({result.load for result in results})
    lines += ["", f"Load average during the runs: {'; '.join(loads)}.", ""]
    if failed:
        lines += [f"Not measured: {'; '.join(failed)}.", ""]
    return "\n".join(lines)


def write_section(path: str, text: str) -> None:
    """Replace what lies between our markers in ``path``, appending them when missing.

    The rest of the file belongs to someone else: it is re-read right before writing and kept
    byte for byte.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            current = handle.read()
    except FileNotFoundError:
        current = ""
    section = f"{MARKER_BEGIN}\n{text.rstrip()}\n{MARKER_END}"
    begin, end = current.find(MARKER_BEGIN), current.find(MARKER_END)
    if begin >= 0 and end > begin:
        updated = current[:begin] + section + current[end + len(MARKER_END) :]
    else:
        if current and not current.endswith("\n"):
            current += "\n"
        updated = current + ("\n" if current else "") + section + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(updated)


def log(message: str) -> None:
    print(f"bench_netns: {message}", file=sys.stderr, flush=True)


def stop_on_signal(number: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {number}")


def main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[1] == "helper":
        return helper(json.loads(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--total", type=int, default=20_000, help="sockets per run (all netns)")
    parser.add_argument("--counts", default="1,10,100", help="namespace counts, comma-separated")
    parser.add_argument("--polls", type=int, default=5, help="measured polls per setting")
    parser.add_argument("--hashes", default="shared,own", help="shared and/or own (per-netns)")
    parser.add_argument(
        "--idle", type=int, default=100, help="namespaces of the idle run (0: none)"
    )
    parser.add_argument("--output", help="Markdown file whose netns-benchmark section to rewrite")
    args = parser.parse_args(argv[1:])
    counts = [int(word) for word in args.counts.split(",")]
    hashes = args.hashes.split(",")
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    if not 0 < args.total <= MAX_TOTAL or any(not 0 < c <= MAX_NAMESPACES for c in counts):
        parser.error(f"--total must be 1..{MAX_TOTAL}, --counts 1..{MAX_NAMESPACES}")
    if not set(hashes) <= {"shared", "own"} or not 1 <= args.polls <= 20:
        parser.error("--hashes takes shared,own; --polls 1..20")
    signal.signal(signal.SIGTERM, stop_on_signal)
    run_id = secrets.token_hex(3)
    results: list[RunResult] = []
    failed: list[str] = []
    runs = [(count, args.total, mode) for mode in hashes for count in counts]
    runs += [(args.idle, 0, "shared")] if args.idle else []
    try:
        for count, total, hash_mode in runs:
            label = f"{count} namespaces, {hash_mode} hash" + ("" if total else ", idle")
            log(f"{label} ...")
            try:
                result = measure_run(count, total, hash_mode, args.polls, f"bnn-{run_id}")
            except BenchError as error:  # this run only: the others still tell something
                log(f"  failed: {error}")
                failed.append(f"{label}: {error} (host TCP objects: {host_tcp_objects():,})")
                continue
            results.append(result)
            log(f"  {milliseconds(per_poll(result.default))} ms per poll")
    except CountMismatch as error:
        log(f"count mismatch: {error}")
        return 1
    except (OSError, subprocess.SubprocessError) as error:
        log(f"failed: {error}")
        return 2
    if not results:
        return 2
    report = render(results, args.total, args.polls, failed)
    print(report)
    if args.output:
        write_section(args.output, report)
        log(f"wrote {args.output}")
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
