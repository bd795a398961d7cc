"""ESTABLISHED under connection churn, in the default derived mode (issue 12, item 6; issue 21,
item 11).

A known population of long-lived connections sits beside a churn of short connections (opened,
accepted and reset as fast as a few threads can). The exact ESTABLISHED count at any instant is
the long-lived sockets plus the short ones in flight, which the churn bounds (its clients, and
the accept queue of its listener). Every poll must land in that band; before the fix a poll
derived from a sockstat read taken before the dumps came out hundreds of sockets high.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from . import populations
from .netns import REPO_ROOT, Netns, take_snapshots, tcpwatch_env

pytestmark = pytest.mark.integration

LONG_LIVED_PAIRS = 200
CHURN_CLIENTS = 4
CHURN_BACKLOG = 16
CHURN_SECONDS = 20.0
POLLS = 25
WALK_SLACK = 4

# The shared generator (benchmarks/churn.py), inside the namespace for a bounded time: a
# listener that accepts and closes at once, and clients that connect, wait for that close and
# close too.
CHURN = str(REPO_ROOT / "benchmarks" / "churn.py")
CHURN_LOOP = [sys.executable, CHURN, "loop", "--port", "7100", "--clients", str(CHURN_CLIENTS),
              "--backlog", str(CHURN_BACKLOG), "--seconds", str(CHURN_SECONDS)]  # fmt: skip


def test_established_stays_in_the_exact_band_under_churn(netns: Netns) -> None:
    populations.established(netns, pairs=LONG_LIVED_PAIRS, port=7000)
    churn = netns.spawn(CHURN_LOOP, lifetime=CHURN_SECONDS + 30)
    try:
        assert netns.read_line(churn, timeout=10).strip() == "churning"
        snapshots = take_snapshots(netns, *([{"process_attribution": False}] * POLLS))
    finally:
        churn.kill()
        churn.wait(timeout=10)
    low = 2 * LONG_LIVED_PAIRS
    # In flight: each client's socket and the server's child it pairs with (a client waits for
    # its child's close, so there are never more children than clients). A dump is not atomic,
    # `ss`'s included: a connection counted early in the walk may close while a new one opens
    # ahead of it, and both are counted. WALK_SLACK bounds that here (measured: at most 2).
    high = low + 2 * CHURN_CLIENTS + WALK_SLACK
    counted = [snapshot["sockets"]["counts"]["ipv4"]["established"] for snapshot in snapshots]
    outside = [count for count in counted if not low <= count <= high]
    assert not outside, f"ESTABLISHED outside [{low}, {high}] in polls: {counted}"
    churned = sum(1 for snapshot in snapshots if snapshot["sockets"]["churned"])
    methods = [snapshot["sockets"]["established_method"] for snapshot in snapshots]
    assert churned > 0, f"the churn was never detected: {counted} {methods}"


# Polls as serve makes them between destination scans, each given the previous poll's table:
# after a poll that saw the namespace move, the next counts ESTABLISHED in its one walk.
_CHAINED = """
import json, sys
from tcpwatch.config import CollectSettings
from tcpwatch.snapshot import take_snapshot
settings = CollectSettings(process_attribution=False)
rows, earlier = [], None
for _ in range(int(sys.argv[1])):
    table = take_snapshot(settings, earlier=earlier).sockets
    rows.append([table.counts["ipv4"]["established"], table.churned, table.established_method])
    earlier = table
print(json.dumps(rows), flush=True)
"""


def test_polls_after_churn_walk_once_and_stay_in_the_band(netns: Netns) -> None:
    populations.established(netns, pairs=LONG_LIVED_PAIRS, port=7000)
    churn = netns.spawn(CHURN_LOOP, lifetime=CHURN_SECONDS + 30)
    try:
        assert netns.read_line(churn, timeout=10).strip() == "churning"
        done = netns.run(sys.executable, "-c", _CHAINED, str(POLLS), timeout=120,
                         env=tcpwatch_env(), cwd=str(REPO_ROOT))  # fmt: skip
    finally:
        churn.kill()
        churn.wait(timeout=10)
    rows = json.loads(done.stdout)
    low = 2 * LONG_LIVED_PAIRS
    high = low + 2 * CHURN_CLIENTS + WALK_SLACK
    outside = [row for row in rows if not low <= row[0] <= high]
    assert not outside, f"ESTABLISHED outside [{low}, {high}]: {rows}"
    # A poll after one that moved counts in its walk ("dumped"), moved or not itself.
    after_churn = [row for previous, row in itertools.pairwise(rows) if previous[1]]
    assert after_churn, f"the churn was never detected: {rows}"
    assert all(row[2] == "dumped" for row in after_churn), rows


# --- issue 21, item 11: 300 held pairs + a steady ~10-14k connect/close per second -------------

HELD_PAIRS = 300
SAMPLES = 80
WRK_CONNECTIONS = 8
NGINX_PORT = 7200
# At this rate a walk double-counts more than under the few-thread churn above: every connection
# that opens ahead of the walk while one behind it closes is counted twice. ss itself read 624 once
# (held + in flight + 8) and tcpwatch 621 once in CI; 16 leaves room for a slow walk on a loaded
# machine and still fails on what the bug did (far below the held pairs, or hundreds above).
CHURN_WALK_SLACK = 16


# Inside the namespace: SAMPLES rounds of one tcpwatch poll then one `ss` count, alternately, as
# the issue sampled them; prints one JSON line.
_SAMPLER = """
import json, subprocess, sys, time
from tcpwatch.config import CollectSettings
from tcpwatch.snapshot import take_snapshot
settings = CollectSettings(process_attribution=False)
rows = []
deadline = time.monotonic() + 150
for _ in range(int(sys.argv[1])):
    if time.monotonic() > deadline:
        break
    snap = take_snapshot(settings)
    ss = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True,
                        text=True, check=True).stdout
    rows.append([snap.sockets.counts["ipv4"]["established"], snap.sockets.churned,
                 len(ss.splitlines())])
print(json.dumps(rows), flush=True)
"""


def _nstat_opens(ns: Netns) -> int:
    counters = ns.nstat()
    return counters.get("TcpActiveOpens", 0)


def test_established_matches_ss_under_steady_churn(netns: Netns, tmp_path: Path) -> None:
    """The issue's case with the real programs: nginx closing every request (keepalive 0) and
    wrk opening a connection per request, beside 300 held pairs. Before the fix, polls whose
    sockstat `inuse` happened to be the same before and after the dumps kept a derived count that
    no instant had (484-576 instead of 600 in 4 of 80 samples); `ss` never did."""
    # TIME_WAIT is capped in this namespace only, so each poll's dump stays short.
    netns.sysctl("net.ipv4.tcp_max_tw_buckets", 16384)
    populations.established(netns, pairs=HELD_PAIRS, port=7000)
    churn = netns.spawn(
        [sys.executable, CHURN, "nginx", "--port", str(NGINX_PORT), "--dir", str(tmp_path),
         "--connections", str(WRK_CONNECTIONS), "--seconds", "200"],
        lifetime=210,
    )  # fmt: skip
    assert netns.read_line(churn, timeout=30).strip() == "churning"
    try:
        opens_before = _nstat_opens(netns)
        sampler = netns.spawn(
            [sys.executable, "-c", _SAMPLER, str(SAMPLES)],
            lifetime=180,
            env=tcpwatch_env(),
            cwd=str(REPO_ROOT),
        )
        line = netns.read_line(sampler, timeout=175)
        opens = _nstat_opens(netns) - opens_before
    finally:
        netns.stop(churn)
    assert line, f"sampler said nothing: {netns.stderr_of(sampler)}"
    rows = json.loads(line)
    assert len(rows) >= SAMPLES // 2, f"only {len(rows)} samples in the time allowed"
    held = 2 * HELD_PAIRS
    # In flight: wrk's connections and nginx's side of each, plus CHURN_WALK_SLACK: a walk is not
    # atomic, `ss`'s included. The upper bound is that estimate or what ss itself read, whichever
    # is higher.
    ours = [row[0] for row in rows]
    theirs = [row[2] for row in rows]
    assert all(held <= n for n in theirs), f"ss itself read below {held}: {theirs}"
    high = max(held + 2 * WRK_CONNECTIONS + CHURN_WALK_SLACK, max(theirs))
    outside = [n for n in ours if not held <= n <= high]
    assert not outside, f"tcpwatch left [{held}, {high}] (ss: {min(theirs)}-{max(theirs)}): {ours}"
    assert opens > 1000 * len(rows) // 10, f"too little churn to mean anything: {opens} opens"
    churned = sum(1 for row in rows if row[1])
    print(f"{len(rows)} samples, {opens} connections opened, fell back in {churned}")
