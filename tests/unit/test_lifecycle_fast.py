"""The destroy reader's one-unpack path (lifecycle_peers: a message laid out as the previous
one) counts exactly what the long path counts: the same recvmmsg-like batches of hand-built
messages, every layout and kind mixed, read with ``fast_path`` on and off."""

from __future__ import annotations

import random
import struct

from tcpwatch.sources.lifecycle_peers import LifecycleAggregator, table_of
from tcpwatch.sources.netlink import INET_DIAG_INFO
from tests.unit.test_lifecycle import (
    CLEARED_INFO,
    CONTEXT,
    NEVER_INFO,
    OK_INFO,
    REFUSED_INFO,
    TIMEOUT_INFO,
    WORKED_INFO,
    attribute,
    destroy_message,
    info_bytes,
)

SLOT = 2048


def info_last(info: bytes, **where: object) -> bytes:
    """PROTOCOL first, then INFO: the other layout."""
    body = destroy_message(info=None, **where) + attribute(INET_DIAG_INFO, info)  # type: ignore[arg-type]
    return struct.pack("=I", len(body)) + body[4:]


def kinds(rng: random.Random) -> list[bytes]:
    port = rng.randrange(33000, 60000)
    info = rng.choice(
        [OK_INFO, TIMEOUT_INFO, REFUSED_INFO, info_bytes(busy_time=9, rwnd_limited=4, delivered=2)]
    )
    return [
        destroy_message(sport=port, dport=rng.choice([5432, 6379]), info=info),
        destroy_message("10.0.0.1", 8080, f"10.0.0.{rng.randrange(1, 9)}", port, OK_INFO),
        destroy_message("::1", port, "::1", 443, info),
        destroy_message("0.0.0.0", port, "127.0.0.1", 0, CLEARED_INFO),
        destroy_message("0.0.0.0", port, "127.0.0.1", 0, NEVER_INFO),
        destroy_message("127.0.0.1", port, "127.0.0.1", 0, WORKED_INFO),
        destroy_message("0.0.0.0", 8080, "0.0.0.0", 0, CLEARED_INFO),  # a listener
        destroy_message(sport=port, info=info_bytes(104, total_retrans=1)),  # short tcp_info
        destroy_message(sport=port, info=None),  # no INFO: ignored
        destroy_message(sport=port, info=None, protocol=None),  # no attribute; a slot's old bytes
        info_last(info, sport=port),
        destroy_message(sport=port, info=info)[:60],  # cut: malformed
    ]


def batches(seed: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(40):
        size = rng.randrange(1, 65)
        common = rng.random() < 0.7  # mostly the usual layout, as a churn gives
        batch = []
        for _ in range(size):
            choices = kinds(rng)
            batch.append(choices[0] if common and rng.random() < 0.8 else rng.choice(choices))
        out.append(batch)
    return out


def read(fast: bool, seed: int) -> tuple[object, ...]:
    aggregator = LifecycleAggregator(clock=lambda: 1000.0)
    aggregator.fast_path = fast
    aggregator.update_context(CONTEXT)
    slots = bytearray(64 * SLOT)
    drains = []
    for batch in batches(seed):
        for index, datagram in enumerate(batch):
            slots[index * SLOT : index * SLOT + len(datagram)] = datagram
        aggregator.consume(memoryview(slots), [len(d) for d in batch], stride=SLOT)
        drains.append(table_of(aggregator.stats(overruns=0, lost=0, receive_buffer=0)))
    return aggregator.events, aggregator.ignored, aggregator.malformed, tuple(drains)


def test_one_unpack_path_counts_what_the_long_path_counts() -> None:
    for seed in range(6):
        fast, slow = read(True, seed), read(False, seed)
        assert fast == slow
        events, ignored, malformed, drains = fast
        assert events > 1000 and ignored > 0 and malformed > 0
        assert any(row.closed for drain in drains for row in drain.peers)  # type: ignore[attr-defined]


def test_the_one_unpack_path_is_taken() -> None:
    aggregator = LifecycleAggregator()
    aggregator.update_context(CONTEXT)
    message = destroy_message(info=OK_INFO)
    layouts: list[int] = []
    calls: list[int] = []
    original = aggregator._fast_struct

    def spy(info_at: int):  # type: ignore[no-untyped-def]
        unpack, size = original(info_at)
        layouts.append(info_at)

        def counted(data, offset):  # type: ignore[no-untyped-def]
            calls.append(offset)
            return unpack(data, offset)

        return counted, size

    aggregator._fast_struct = spy  # type: ignore[method-assign]
    aggregator.feed(memoryview(message * 5), 5 * len(message))
    assert layouts == [88] and aggregator.events == 5
    assert calls == [n * len(message) for n in range(1, 5)]  # the first one learnt the layout
