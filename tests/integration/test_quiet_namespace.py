"""A namespace where nothing moves costs a listener dump, not a walk of the host's hash (issue 20
item 2), and is still counted exactly.

Between two polls in which no segment came or went in a namespace (its Tcp MIB's InSegs,
OutSegs ... and sockstat's inuse and tw all equal), its sockets cannot have changed state but by
a timer that sends nothing; a poll then dumps only the listeners (their queues move without a
segment: accept() takes one) and keeps the rest of the earlier poll's table. Here a real
namespace is polled as ``serve`` polls it (each poll given the previous one's table), and every
poll is compared with ``ss``: quiet polls reuse, an accept() shows in the listener's queue, a
closed connection makes the next poll walk again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.model import SocketTable
from tcpwatch.snapshot import poll

from .netns import Netns, parse_ss

pytestmark = pytest.mark.integration

PAIRS = 20
QUEUED = 3
PORT = 7400

# Inside the namespace, bounded by Netns.spawn's lifetime: a listener with PAIRS accepted
# connections and QUEUED more waiting in its accept queue. SIGUSR1 accepts one of those (no
# segment is sent: the handshake is done); SIGUSR2 closes one accepted connection's client.
_HELPER = f"""
import os, signal, socket, time
listener = socket.socket()
listener.bind(("127.0.0.1", {PORT}))
listener.listen(16)
clients, accepted = [], []
for _ in range({PAIRS}):
    clients.append(socket.create_connection(("127.0.0.1", {PORT})))
    accepted.append(listener.accept()[0])
waiting = [socket.create_connection(("127.0.0.1", {PORT})) for _ in range({QUEUED})]

def accept_one(*_):
    accepted.append(listener.accept()[0])

def close_one(*_):
    clients.pop().close()

signal.signal(signal.SIGUSR1, accept_one)
signal.signal(signal.SIGUSR2, close_one)
print(os.getpid(), flush=True)
while True:
    time.sleep(1)
"""


def ss_counts(ns: Netns) -> Counter[tuple[str, str]]:
    return Counter((s.family, s.state) for s in parse_ss(ns.ss("-tanH")))


def table_counts(table: SocketTable) -> Counter[tuple[str, str]]:
    counts = table.counts
    return Counter({(f, s): n for f, by_state in counts.items() for s, n in by_state.items() if n})


def test_quiet_polls_reuse_the_table_and_stay_exact() -> None:
    settings = CollectSettings(process_attribution=False)
    with Netns() as ns:
        helper = ns.spawn([sys.executable, "-c", _HELPER], lifetime=120)
        pid = int(ns.read_line(helper))  # the helper's own pid (Netns wraps it in timeout)
        time.sleep(0.3)  # the last ACKs and window updates of the handshakes

        def next_poll(earlier: SocketTable | None) -> SocketTable:
            for _ in range(5):  # a table taken while the namespace moved is taken again
                (snapshot,) = poll(
                    settings, (ns.name,), earlier=None if earlier is None else {ns.name: earlier}
                )
                assert snapshot.sockets is not None, snapshot.sources
                if not snapshot.sockets.churned:
                    return snapshot.sockets
                time.sleep(0.2)
            raise AssertionError("the namespace never stood still")

        first = next_poll(None)
        assert not first.unchanged and first.marks
        assert table_counts(first) == ss_counts(ns)
        (listener,) = first.listeners
        assert listener.queue_length == QUEUED

        quiet = next_poll(first)
        assert quiet.unchanged
        assert quiet.messages == 1  # the listener alone: the established hash was not walked
        assert table_counts(quiet) == table_counts(first) == ss_counts(ns)

        # accept() moves the listener's queue and sends nothing: still quiet, queue fresh.
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
        accepted = next_poll(quiet)
        assert accepted.unchanged
        assert accepted.listeners[0].queue_length == QUEUED - 1
        assert table_counts(accepted) == ss_counts(ns)

        # A close sends a FIN: the next poll walks again and sees FIN_WAIT2 and CLOSE_WAIT.
        os.kill(pid, signal.SIGUSR2)
        time.sleep(0.3)
        moved = next_poll(accepted)
        assert not moved.unchanged
        assert moved.total("close_wait") == moved.total("fin_wait2") == 1
        assert table_counts(moved) == ss_counts(ns)

        settled = next_poll(moved)
        assert settled.unchanged
        assert table_counts(settled) == ss_counts(ns)


# Inside a namespace: BATCH TIME_WAIT sockets per family in FAMILIES (argv[1], "4" or "46"),
# then, GAP seconds later, BATCH more IPv4 ones; the client closes first and keeps TIME_WAIT.
# tcp_tw_reuse is 0 in the namespace, so no connect() takes over a TIME_WAIT port.
BATCH = 6
GAP = 4.0
_TIME_WAIT_HELPER = f"""
import socket, sys, time

def time_wait(family, host):
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen(16)
    for _ in range({BATCH}):
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        client.close()
        time.sleep(0.01)
        server.close()
    listener.close()

time_wait(socket.AF_INET, "127.0.0.1")
if "6" in sys.argv[1]:
    time_wait(socket.AF_INET6, "::1")
print("first", flush=True)
time.sleep({GAP})
time_wait(socket.AF_INET, "127.0.0.1")
print("second", flush=True)
time.sleep(300)
"""
TIME_WAIT_SECONDS = 60  # TCP_TIMEWAIT_LEN


def test_expiring_time_wait_is_counted_without_a_walk_when_one_family_holds_it() -> None:
    """TIME_WAIT sockets that expire between two polls (a timer that sends nothing) lower
    sockstat's ``tw`` and nothing else. With TIME_WAIT in one family only, the poll subtracts
    them there and dumps only the listeners; with both families holding some (``tw`` mixes
    them), it walks. Every poll equals ss, per family and state."""
    settings = CollectSettings(process_attribution=False)
    with Netns() as one, Netns() as both:
        for ns in (one, both):
            ns.sysctl("net.ipv4.tcp_tw_reuse", 0)
        helpers = {
            one.name: one.spawn([sys.executable, "-c", _TIME_WAIT_HELPER, "4"], lifetime=150),
            both.name: both.spawn([sys.executable, "-c", _TIME_WAIT_HELPER, "46"], lifetime=150),
        }
        started = time.monotonic()
        for ns in (one, both):
            assert ns.read_line(helpers[ns.name]) == "first"
        for ns in (one, both):
            assert ns.read_line(helpers[ns.name]) == "second"
        time.sleep(0.5)  # the last ACKs

        tables: dict[str, SocketTable] = {}

        def poll_and_compare(ns: Netns) -> SocketTable:
            """One poll as serve makes it between scans, between two equal ss readings."""
            for _ in range(10):
                before = ss_counts(ns)
                earlier = tables.get(ns.name)
                (snapshot,) = poll(
                    settings, (ns.name,), earlier=None if earlier is None else {ns.name: earlier}
                )
                if ss_counts(ns) == before:
                    assert snapshot.sockets is not None, snapshot.sources
                    assert table_counts(snapshot.sockets) == before, ns.name
                    return snapshot.sockets
                time.sleep(0.2)  # expiring while polled: poll again
            raise AssertionError(f"{ns.name} never stood still around a poll")

        for ns in (one, both):
            for _ in range(10):  # a table taken while something moved vouches for nothing
                tables[ns.name] = poll_and_compare(ns)
                if tables[ns.name].marks:
                    break
            assert tables[ns.name].marks, f"{ns.name} never stood still"
        assert tables[one.name].counts["ipv4"]["time_wait"] == 2 * BATCH
        assert tables[both.name].counts["ipv6"]["time_wait"] == BATCH

        # The first batch expires (about 60 s after it was made); the second one is left.
        deadline = started + TIME_WAIT_SECONDS + 20
        while ss_counts(one)[("ipv4", "time_wait")] > BATCH:
            assert time.monotonic() < deadline, "the first TIME_WAIT batch never expired"
            time.sleep(0.5)
        while ss_counts(both)[("ipv6", "time_wait")] > 0:
            assert time.monotonic() < deadline, "the IPv6 TIME_WAIT batch never expired"
            time.sleep(0.5)
        expired = {ns.name: poll_and_compare(ns) for ns in (one, both)}
        assert expired[one.name].unchanged, "one family's TIME_WAIT expired: no walk needed"
        assert expired[one.name].counts["ipv4"]["time_wait"] == BATCH
        assert not expired[both.name].unchanged, "both families held TIME_WAIT: it must walk"
        assert expired[both.name].counts["ipv6"]["time_wait"] == 0

        # The second batch expires too: subtracted again, down to none.
        tables = {name: table for name, table in expired.items()}
        while ss_counts(one)[("ipv4", "time_wait")] > 0:
            assert time.monotonic() < deadline + GAP, "the second TIME_WAIT batch never expired"
            time.sleep(0.5)
        gone = poll_and_compare(one)
        assert gone.unchanged and gone.total("time_wait") == 0
