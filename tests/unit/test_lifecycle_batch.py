"""The destroy reader's columnar path (lifecycle_batch.py: a recvmmsg batch of one layout whose
peers are all cached, counted by columns) counts exactly what the per-event loop counts: the same
batches of hand-built messages in the kernel's layouts, read with and without it, every tracked
peer's every count compared after each batch; and it is taken where it should be."""

from __future__ import annotations

import itertools
import random
import struct
from bisect import bisect_left
from typing import Any

from tcpwatch.sources import lifecycle_batch
from tcpwatch.sources.lifecycle_batch import BatchColumns
from tcpwatch.sources.lifecycle_counts import PeerCounts
from tcpwatch.sources.lifecycle_peers import LifecycleAggregator, table_of
from tcpwatch.sources.netlink import INET_DIAG_INFO
from tests.unit.test_lifecycle import (
    CLEARED_INFO,
    CONTEXT,
    OK_INFO,
    WORKED_INFO,
    attribute,
    destroy_message,
    info_bytes,
)

SLOT = 2048
INBOUND = [("10.0.0.1", 8080), ("::", 8443), ("10.0.0.2", 8080)]  # (local address, port)
OUTBOUND = [("10.0.0.9", 5432), ("10.0.0.8", 6379), ("2001:db8::5", 443), ("127.0.0.1", 5432)]


class NoColumns(BatchColumns):
    """The per-event loop only (the columnar path never taken)."""

    def count_batch(self, *args: Any) -> bool:
        return False


def info_last(info: bytes, **where: Any) -> bytes:
    """PROTOCOL first, then INFO: the layout 6.18 sends."""
    body = destroy_message(info=None, **where) + attribute(INET_DIAG_INFO, info)
    return struct.pack("=I", len(body)) + body[4:]


def random_info(rng: random.Random) -> bytes:
    """A full tcp_info with the fields the reader counts, each often 0 and sometimes large."""

    def value(*choices: int) -> int:
        return rng.choice(choices)

    return info_bytes(
        rtt=value(0, 5, 10, 11, 29, 30, 31, 250, 4000, 65535, 70000, 2_000_000),
        total_retrans=value(0, 0, 3),
        bytes_acked=value(0, 1, 1001, 1 << 40),
        bytes_received=value(0, 1, 501),
        segs_out=value(0, 3, 70000),
        segs_in=value(0, 0, 1, 4),
        delivered=value(0, 2, 3, 3),
        busy_time=value(0, 0, 900, 1 << 33),
        rwnd_limited=value(0, 0, 40),  # also without busy time: not counted then
        sndbuf_limited=value(0, 7),
        snd_wnd=value(0, 65536),
        min_rtt=value(0, 10),
    )


def event(rng: random.Random, last: bool, peers: int) -> bytes:
    """A destroy message of one of ``peers`` cached-to-be peers (or a new one when 0)."""
    info = random_info(rng)
    place: dict[str, Any] = {"info": info}
    if rng.random() < 0.5:
        local, port = rng.choice(INBOUND[:peers] or [("10.0.0.3", 9000)])
        remote, remote_port = f"10.1.0.{rng.randrange(1, 200)}", rng.randrange(1024, 65535)
        if rng.random() < 0.2:  # a client at what is also an outbound peer's address and port
            remote, remote_port = OUTBOUND[0]
        if ":" in local:
            local, remote = "::1", "2001:db8::7"
        place.update(source=local, sport=port, destination=remote, dport=remote_port)
    else:
        remote, port = rng.choice(OUTBOUND[:peers] or [("10.9.9.9", 7777)])
        local = "2001:db8::1" if ":" in remote else "10.0.0.1"
        place.update(
            source=local, sport=rng.randrange(32768, 61000), destination=remote, dport=port
        )
    return info_last(**place) if last else destroy_message(**place)


def batch(rng: random.Random, last: bool) -> tuple[list[bytes], str]:
    """A recvmmsg batch: mostly one that the columnar path can take, else one odd event."""
    size = rng.randrange(4, 65)
    datagrams = [event(rng, last, peers=rng.choice([1, 2, 7])) for _ in range(size)]
    odd = ["cleared", "worked", "listener", "new", "cut", "short", "keys", "family"]
    kind = rng.choice(["clean"] * 7 + odd)
    where = rng.randrange(size)
    if kind == "cleared":  # a connect tcp_disconnect cleared: port 0
        datagrams[where] = destroy_message("0.0.0.0", 40000, "10.0.0.9", 0, CLEARED_INFO)
    elif kind == "worked":  # one that had worked, then cut: port 0, its route cached
        datagrams[where] = destroy_message("10.0.0.1", 40000, "10.0.0.9", 0, WORKED_INFO)
    elif kind == "listener":  # a closed listener, at a cached inbound route's address and port
        datagrams[where] = destroy_message("10.0.0.1", 8080, "0.0.0.0", 0, CLEARED_INFO)
    elif kind == "new":  # a peer not cached yet
        datagrams[where] = event(rng, last, peers=0)
    elif kind == "cut":
        datagrams[where] = b"\xff" * (SLOT + 1)  # longer than its slot: length -1
    elif kind == "short":  # another length: a short tcp_info
        datagrams[where] = destroy_message(sport=40001, info=info_bytes(104, total_retrans=1))
    elif kind == "family":  # an unknown address family: malformed
        datagrams[where] = datagrams[where][:16] + b"\x63" + datagrams[where][17:]
    elif kind == "keys":  # more outbound peers in one batch than the columns group
        for index in range(min(size, 12)):
            datagrams[index] = destroy_message("10.0.0.1", 40000, f"10.2.0.{index}", 80, OK_INFO)
    return datagrams, kind


def state(aggregator: LifecycleAggregator) -> tuple[object, ...]:
    """Everything the reader keeps: totals, each tracked peer's every count, routes, cleared."""
    names = {id(peer): key for key, peer in aggregator._peers.items()}
    peers = sorted(
        (key, tuple(getattr(peer, slot) for slot in PeerCounts.__slots__))
        for key, peer in aggregator._peers.items()
    )
    routes = sorted((key, names.get(id(peer))) for key, peer in aggregator._routes.items())
    return (
        aggregator.events,
        aggregator.ignored,
        aggregator.malformed,
        aggregator.evicted,
        peers,
        routes,
        sorted(aggregator._cleared.items()),
    )


def run(columns: BatchColumns, seed: int) -> tuple[list[tuple[object, ...]], list[object]]:
    ticks = itertools.count(1000)  # a clock read as often in both runs: last_seen compared
    aggregator = LifecycleAggregator(max_peers=64, clock=lambda: float(next(ticks)))
    aggregator.columns = columns
    aggregator.update_context(CONTEXT)
    rng = random.Random(seed)
    slots = bytearray(64 * SLOT)
    states, drains = [], []
    for number in range(60):
        datagrams, _ = batch(rng, last=seed % 2 == 0)
        lengths = []
        for index, datagram in enumerate(datagrams):
            slots[index * SLOT : index * SLOT + min(len(datagram), SLOT)] = datagram[:SLOT]
            lengths.append(len(datagram) if len(datagram) <= SLOT else -1)
        aggregator.consume(memoryview(slots), lengths, stride=SLOT)
        states.append(state(aggregator))
        if number % 10 == 9:
            drains.append(table_of(aggregator.stats(overruns=0, lost=0, receive_buffer=0)))
    return states, drains


def test_the_columns_count_what_the_per_event_loop_counts() -> None:
    taken = 0
    for seed in range(8):
        columns = BatchColumns()
        by_columns, by_events = run(columns, seed), run(NoColumns(), seed)
        for number, (mine, theirs) in enumerate(zip(by_columns[0], by_events[0], strict=True)):
            assert mine == theirs, f"seed {seed}, batch {number}"
        assert by_columns[1] == by_events[1]
        assert 10 < columns.taken < 60  # taken most of the time, not always
        taken += columns.taken
        events, ignored, malformed = by_columns[0][-1][:3]
        assert isinstance(events, int) and events > 1000
        assert ignored and malformed
    assert taken > 8 * 20


def feed(aggregator: LifecycleAggregator, datagrams: list[bytes]) -> None:
    slots = bytearray(len(datagrams) * SLOT)
    for index, datagram in enumerate(datagrams):
        slots[index * SLOT : index * SLOT + len(datagram)] = datagram
    aggregator.consume(memoryview(slots), [len(d) for d in datagrams], stride=SLOT)


def test_taken_only_for_a_batch_of_cached_peers_without_port_0() -> None:
    aggregator = LifecycleAggregator(clock=lambda: 5.0)
    aggregator.update_context(CONTEXT)
    inbound = info_last(OK_INFO, source="10.0.0.1", sport=8080, dport=51000)
    outbound = info_last(OK_INFO, sport=40000, destination="10.0.0.9", dport=5432)
    feed(aggregator, [inbound, outbound] * 8)  # two new peers: the loop, which caches them
    assert aggregator.columns.taken == 0
    feed(aggregator, [inbound, outbound] * 8)
    assert aggregator.columns.taken == 1
    feed(aggregator, [inbound, outbound] * 4)  # too few to pay for the columns' fixed cost
    to = {"sport": 40002, "destination": "10.0.0.9", "dport": 5432}
    odd = [
        info_last(CLEARED_INFO, source="0.0.0.0", **{**to, "dport": 0}),  # port 0: cleared
        destroy_message(info=OK_INFO, **to),  # INFO before PROTOCOL: another layout
        info_last(info_bytes(104, total_retrans=1), **to),  # another length
    ]
    for message in odd:
        feed(aggregator, [inbound, outbound] * 7 + [inbound, message])
    assert aggregator.columns.taken == 1
    rows = {row.peer: row for row in table_of(aggregator.stats(0, 0, 0)).peers}
    assert rows["0.0.0.0:8080"].closed["ok"] == 44 and rows["0.0.0.0:8080"].rtt_count == 44
    assert rows["10.0.0.9:5432"].closed == {"ok": 42, "timeout": 1, "refused": 0, "aborted": 0}
    assert rows["10.0.0.9:5432"].bytes_sent == 42 * 1001
    aggregator.fast_path = False  # the readable long way, every message
    feed(aggregator, [inbound, outbound] * 8)
    assert aggregator.columns.taken == 1


def test_the_rtt_table_is_bisect_left() -> None:
    table = lifecycle_batch._BUCKETS
    assert table[0] == lifecycle_batch._NO_RTT  # RTT 0 is not counted
    assert all(
        table[rtt] == bisect_left(lifecycle_batch.RTT_BOUNDS_US, rtt) for rtt in range(1, 1 << 16)
    )
