"""The tcpwatch side of the benchmark: a child process that polls on command and times each poll.

Started inside the benchmark's namespace by bench_poll.py, one process per setting, so each
setting's peak RSS is its own. Protocol, one JSON line per command::

    (start)  < {"ready": true, "rss_kib": 23112}
    > poll   < {"user": 0.021, "sys": 0.012, "wall": 0.034, "counts": {...}, "sources": [...], ...}
    > dumps  < {"user": 0.002, "sys": 0.011, "wall": 0.013, "messages": 1106}
    > walk   < {"user": 0.001, "sys": 0.009, "wall": 0.010, "messages": 0}
    > exit   < {"maxrss_kib": 31020, "profile": [...]}

CPU is this process' own user and system time (getrusage): the kernel's walk of the socket
tables runs in our send() and recvmsg() calls, so it lands in ``sys``.

``dumps`` and ``walk`` split a poll's sock_diag cost. Both run tcpwatch's own
``sockets.collect`` (so the same dumps, whatever its plan) with the message parser swapped for
one that only steps over netlink headers; ``walk`` also swaps every request's state mask for one
no socket matches (bit 0, an unused state), leaving the kernel's walk of its hash tables and
nothing to copy out. So: walk = kernel walk; dumps - walk = copying messages out; poll without
attribution - dumps = Python parsing plus the /proc reads.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import resource
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import IO, Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcpwatch.config import CollectSettings, Config
from tcpwatch.model import Attribution, Snapshot, SocketTable
from tcpwatch.paths import ProcPaths
from tcpwatch.pipeline import Pipeline
from tcpwatch.render.prometheus import render
from tcpwatch.snapshot import take_snapshot
from tcpwatch.sources import netlink, procnet, sockdiag, sockets, sysctl

PROFILE_ROWS = 10
_NLMSG = struct.Struct("=IH")
NLMSG_ERROR = 2
NLMSG_DONE = 3
NO_STATE_MASK = 1  # bit 0: no TCP state is numbered 0, so no socket matches
TIMER_TIME_WAIT = 3  # idiag_timer of timewait sockets
REQUEST_STATES = frozenset({3, 12})  # SYN_RECV, NEW_SYN_RECV: request sockets (near enough)
FAMILY_NAME = {2: "ipv4", 10: "ipv6"}  # idiag_family


class HeaderOnlyAggregator(sockdiag.DumpAggregator):
    """Steps over the messages of a dump without decoding them: the cost of receiving alone.

    It still counts full sockets (neither TIME_WAIT nor a request socket, judged by the state
    and timer bytes alone), because collect() skips the ESTABLISHED dump of a family once the
    first dump has seen all of them.
    """

    def feed(self, data: memoryview | bytes, length: int, family: str | None) -> bool:
        offset = 0
        while offset < length:
            message_length, message_type = _NLMSG.unpack_from(data, offset)
            if message_type == NLMSG_DONE:
                return True
            if message_type == NLMSG_ERROR or message_length < 16:
                raise netlink.SockDiagError(f"dump failed at byte {offset} (type {message_type})")
            self.messages += 1
            if data[offset + 18] != TIMER_TIME_WAIT and data[offset + 17] not in REQUEST_STATES:
                self.totals[FAMILY_NAME[data[offset + 16]]].full_sockets += 1
            offset += (message_length + 3) & ~3
        return False


ORIGINAL_BUILD_REQUEST = netlink.build_request


def _no_state_request(
    family: str | None, states: int, bytecode: bytes = b"", sequence: int = 1, extensions: int = 0
) -> bytes:
    return ORIGINAL_BUILD_REQUEST(family, NO_STATE_MASK, bytecode, sequence, extensions)


@contextlib.contextmanager
def swapped(module: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def dumps_only(settings: CollectSettings, walk_only: bool) -> dict[str, Any]:
    """tcpwatch's sock_diag dumps with the parsing (and, for walk_only, the matching) left out."""
    # The same inputs take_snapshot() hands to sockets.collect(), read before the clock starts.
    paths = ProcPaths()
    port_range = sysctl.read_sysctls(paths).port_range
    sockstat = procnet.read_sockstat(paths)
    inuse = None
    if settings.established == "derived":
        inuse = {"ipv4": sockstat.inuse_ipv4, "ipv6": sockstat.inuse_ipv6}
    with contextlib.ExitStack() as stack:
        stack.enter_context(swapped(sockdiag, "DumpAggregator", HeaderOnlyAggregator))
        if walk_only:
            stack.enter_context(swapped(netlink, "build_request", _no_state_request))
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        table = sockets.collect(
            port_range,
            inuse,
            (),
            dump_established=settings.established == "dumped",
            time_wait=sockstat.time_wait,
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "wall": wall,
        "messages": table.messages,
    }


def current_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def describe(snapshot: Snapshot) -> dict[str, Any]:
    """The parts of a snapshot the benchmark checks and reports."""
    sockets = snapshot.sockets
    attribution = snapshot.attribution
    return {
        "counts": {family: dict(states) for family, states in sockets.counts.items()}
        if sockets
        else None,
        "messages": sockets.messages if sockets else None,
        "established_method": sockets.established_method if sockets else None,
        "destinations": len(sockets.ephemeral_use) if sockets else None,
        "sources": [
            [status.name, status.ok, status.duration_seconds, status.error]
            for status in snapshot.sources
        ],
        "attribution": None
        if attribution is None
        else {
            "owners": len(attribution.owners),
            "processes_scanned": attribution.processes_scanned,
            "complete": attribution.complete,
        },
    }


def profile_rows(profiler: cProfile.Profile) -> list[list[Any]]:
    """Top functions by own time: [function, calls, own seconds, cumulative seconds]."""
    stats = pstats.Stats(profiler)
    rows: list[list[Any]] = []
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    entries = stats.stats  # type: ignore[attr-defined]
    for (filename, line, function), (_, calls, own, cumulative, _) in entries.items():
        where = f"{os.path.basename(filename)}:{line}({function})" if line else function
        rows.append([where, calls, own, cumulative])
    rows.sort(key=lambda row: -float(row[2]))
    return rows[:PROFILE_ROWS]


def after_the_snapshot(pipeline: Pipeline, snapshot: Snapshot) -> dict[str, float]:
    """CPU of what serve does with a poll's snapshot (this thread's clock): the pipeline's rules,
    history and trends, then one exposition of the resulting state, as a scrape renders it."""
    started = time.thread_time()
    state = pipeline.poll(Config())
    ruled = time.thread_time()
    body = render(state)
    rendered = time.thread_time()
    return {
        "rules_cpu": ruled - started,
        "render_cpu": rendered - ruled,
        "exposition_bytes": len(body),
    }


def serve(
    settings: CollectSettings,
    profile: bool,
    commands: IO[str],
    replies: IO[str],
    remember_owners: bool = False,
    reuse_destinations: bool = False,
) -> int:
    profiler = cProfile.Profile() if profile else None
    latest: list[Snapshot] = []  # the poll's snapshot, handed to the pipeline's rules
    pipeline = Pipeline(take=lambda _config: tuple(latest), long_lived=False, log_failures=False)
    known: Attribution | None = None  # the previous poll's owners, as tcpwatch serve keeps them
    earlier: SocketTable | None = None  # and its per-destination scan, between scans

    def reply(data: dict[str, Any]) -> None:
        replies.write(json.dumps(data) + "\n")
        replies.flush()

    reply({"ready": True, "rss_kib": current_rss_kib()})
    for line in commands:
        command = line.strip()
        if command == "exit":
            break
        if command in ("dumps", "walk"):
            reply(dumps_only(settings, walk_only=command == "walk"))
            continue
        if command != "poll":
            reply({"error": f"unknown command {command!r}"})
            continue
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        snapshot = take_snapshot(
            settings,
            known_owners=known if remember_owners else None,
            earlier=earlier if reuse_destinations else None,
        )
        latest[:] = [snapshot]
        known = snapshot.attribution
        # The population holds still, so the next poll would find the namespace quiet and dump
        # only its listeners (sockets.py); these rows measure the walking poll of a host with
        # traffic (bench_serve.py measures both).
        earlier = replace(snapshot.sockets, marks=()) if snapshot.sockets else None
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        result = describe(snapshot)
        result.update(
            user=after.ru_utime - before.ru_utime,
            sys=after.ru_stime - before.ru_stime,
            wall=wall,
        )
        result.update(after_the_snapshot(pipeline, snapshot))
        reply(result)
    final: dict[str, Any] = {"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if profiler is not None:
        final["profile"] = profile_rows(profiler)
    reply(final)
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="tcpwatch poll child of bench_poll.py")
    parser.add_argument("--established", choices=("derived", "dumped"), default="derived")
    parser.add_argument(
        "--attribution",
        choices=("on", "off", "remembered", "serve"),
        default="on",
        help="on: every poll walks /proc/*/fd (tcpwatch check/metrics); remembered: owners found "
        "by the previous poll are re-checked with one readlink each (tcpwatch serve on a "
        "destination-scan poll); serve: that, and the previous per-destination scan reused "
        "(tcpwatch serve between scans)",
    )
    parser.add_argument("--cprofile", action="store_true", help="profile the polls (cProfile)")
    args = parser.parse_args(argv)
    settings = CollectSettings(
        established=args.established, process_attribution=args.attribution != "off"
    )
    return serve(
        settings,
        args.cprofile,
        sys.stdin,
        sys.stdout,
        remember_owners=args.attribution in ("remembered", "serve"),
        reuse_destinations=args.attribution == "serve",
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
