"""The destroy reader's columnar path (lifecycle_batch.py) on the kernel's own messages: every
recvmmsg batch of a churn (IPv4 and IPv6, inbound and outbound, now and then a refused connect,
whose port the kernel clears) is counted by two readers, one with the columnar path and one with
the per-event loop alone (which test_lifecycle_netns.py holds to ``ss``); they must agree after
every batch, and the columnar path must have counted most batches."""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.netns import REPO_ROOT, Netns, tcpwatch_env

pytestmark = pytest.mark.integration

ROUNDS = 1000  # four connections each (two listeners, both ends), ~63 batches of 64

CHILD = r"""
import json, socket, sys, time
from tcpwatch.sources.lifecycle import open_destroy_socket
from tcpwatch.sources.lifecycle_batch import BatchColumns
from tcpwatch.sources.lifecycle_counts import PeerCounts
from tcpwatch.sources.lifecycle_events import make_context
from tcpwatch.sources.lifecycle_peers import LifecycleAggregator, table_of
from tcpwatch.sources.recvbatch import BatchReceiver

class NoColumns(BatchColumns):
    def count_batch(self, *args):
        return False

def state(reader):
    names = {id(peer): key for key, peer in reader._peers.items()}
    peers = sorted((key, repr([getattr(peer, slot) for slot in PeerCounts.__slots__]))
                   for key, peer in reader._peers.items())
    routes = sorted((repr(key), names.get(id(peer))) for key, peer in reader._routes.items())
    return repr((reader.events, reader.ignored, reader.malformed, peers, routes,
                 sorted(reader._cleared.items())))

rounds = int(sys.argv[1])
sock = open_destroy_socket(32 << 20)
servers = []
for family, host, port in ((socket.AF_INET, "127.0.0.1", 20801), (socket.AF_INET6, "::1", 20802)):
    server = socket.socket(family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(512)
    servers.append((server, host, port))
refused = 0
for number in range(rounds):
    for server, host, port in servers:
        client = socket.create_connection((host, port))
        accepted, _ = server.accept()
        client.sendall(b"x" * (1 + number % 3000))
        accepted.recv(4096)
        accepted.close()
        client.close()
    if number % 97 == 0:
        attempt = socket.socket()
        try:
            attempt.connect(("127.0.0.1", 20809))  # nothing listens: refused
        except ConnectionRefusedError:
            refused += 1
        attempt.close()
time.sleep(0.3)
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    port_range = tuple(int(word) for word in f.read().split())
context = make_context({20801, 20802}, port_range, [("127.0.0.1", 20801), ("::1", 20802)])
readers = []
for columns in (BatchColumns(), NoColumns()):
    reader = LifecycleAggregator(clock=lambda: 1000.0)
    reader.columns = columns
    reader.update_context(context)
    readers.append(reader)
receiver = BatchReceiver(sock.fileno())
batches, mismatches = 0, []
while lengths := receiver.receive():
    batches += 1
    for reader in readers:
        reader.consume(receiver.buffer, lengths, stride=receiver.slot_size)
    if state(readers[0]) != state(readers[1]):
        mismatches.append(batches)
drains = [repr(table_of(reader.stats(0, 0, 0))) for reader in readers]
print(json.dumps({
    "batches": batches, "taken": readers[0].columns.taken, "mismatches": mismatches,
    "events": readers[0].events, "refused": refused, "drains_equal": drains[0] == drains[1],
}), flush=True)
"""


def test_columns_count_the_kernels_batches_as_the_per_event_loop(netns: Netns) -> None:
    result = netns.run(
        sys.executable,
        "-c",
        CHILD,
        str(ROUNDS),
        env=tcpwatch_env(),
        cwd=str(REPO_ROOT),
        timeout=240,
    )
    got = json.loads(result.stdout)
    assert got["mismatches"] == [] and got["drains_equal"], got
    assert got["refused"] == len(range(0, ROUNDS, 97))
    assert got["events"] == 4 * ROUNDS + got["refused"]
    assert got["batches"] >= 4 * ROUNDS // 64
    assert got["taken"] >= got["batches"] // 2, got  # most batches: one layout, cached peers
