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
