"""The batch reader (recvmmsg into preallocated slots) and the destroy listener reading through
it: real datagram sockets (a Unix socket pair stands in for netlink: both keep datagram
boundaries), hand-built destroy messages in the kernel's layout."""

from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from tcpwatch.sources import lifecycle
from tcpwatch.sources.lifecycle import DestroyListener
from tcpwatch.sources.lifecycle_peers import LifecycleAggregator, table_of
from tcpwatch.sources.netlink import NLMSG_DONE, SockDiagError
from tcpwatch.sources.recvbatch import SHARED_SLOTS, BatchReceiver, RecvMmsg, Slots, libc_recvmmsg
from tests.unit.test_lifecycle import OK_INFO, REFUSED_INFO, TIMEOUT_INFO, destroy_message


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return reader, writer


def done_message() -> bytes:
    return (20).to_bytes(4, "little") + NLMSG_DONE.to_bytes(2, "little") + bytes(14)


def test_a_batch_is_at_most_the_slots_and_each_datagram_sits_in_its_slot(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    with reader, writer:
        sent = [bytes([n]) * (1 + n) for n in range(100)]
        for datagram in sent:
            writer.send(datagram)
        receiver = BatchReceiver(reader.fileno(), slots=64, slot_size=256)
        got: list[bytes] = []
        batches = []
        while lengths := receiver.receive():
            batches.append(len(lengths))
            for index, length in enumerate(lengths):
                got.append(bytes(receiver.buffer[index * 256 : index * 256 + length]))
        assert batches == [64, 36]
        assert got == sent
        assert receiver.receive() == []  # nothing pending: EAGAIN, not an error


def test_a_datagram_longer_than_its_slot_is_reported_cut(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    with reader, writer:
        writer.send(b"a" * 100)
        writer.send(b"b" * 300)  # longer than a slot: MSG_TRUNC
        writer.send(b"c" * 256)  # exactly a slot: whole
        receiver = BatchReceiver(reader.fileno(), slots=8, slot_size=256)
        assert receiver.receive() == [100, -1, 256]


def test_errors_other_than_would_block_are_raised_with_their_errno() -> None:
    def fail(number: int) -> RecvMmsg:
        def call(fd: int, headers: object, slots: int, flags: int, timeout: object) -> int:
            ctypes.set_errno(number)
            return -1

        return call

    for number in (errno.EAGAIN, errno.EINTR):
        assert BatchReceiver(99, call=fail(number)).receive() == []
    for number in (errno.ENOBUFS, errno.EBADF):
        with pytest.raises(OSError) as raised:
            BatchReceiver(99, call=fail(number)).receive()
        assert raised.value.errno == number


def test_consume_reads_each_slot_concatenated_messages_and_counts_cut_datagrams() -> None:
    stride = 1024
    data = bytearray(4 * stride)
    datagrams = [
        destroy_message(sport=40001, info=OK_INFO) + destroy_message(sport=40002, info=OK_INFO),
        destroy_message(dport=5433, info=TIMEOUT_INFO) + done_message(),
        b"",  # cut (length -1): counted malformed, nothing parsed from it
        destroy_message(dport=5434, info=REFUSED_INFO),
    ]
    for index, datagram in enumerate(datagrams):
        data[index * stride : index * stride + len(datagram)] = datagram
    lengths = [len(datagrams[0]), len(datagrams[1]), -1, len(datagrams[3])]
    aggregator = LifecycleAggregator()
    assert aggregator.consume(memoryview(data), lengths, stride=stride) == 4
    result = table_of(aggregator.stats(0, 0, 0))
    assert (result.events, result.malformed) == (4, 1)
    got = {row.peer: {k: v for k, v in row.closed.items() if v} for row in result.peers}
    assert got == {
        "127.0.0.1:5432": {"ok": 2},
        "127.0.0.1:5433": {"timeout": 1},
        "127.0.0.1:5434": {"refused": 1},
    }
    with pytest.raises(SockDiagError, match="truncated"):
        LifecycleAggregator().consume(memoryview(data), [-1], strict=True, stride=stride)


def test_listener_reads_many_batches_exactly_and_counts_each_overrun_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """1,000 datagrams (16 batches of 64) with two overruns reported among them: every event
    counted once, each ENOBUFS one overrun, reading goes on after each."""
    reader, writer = pair
    with reader, writer:
        for n in range(1000):
            writer.send(destroy_message(sport=40000 + n % 500, dport=5432 + n % 3, info=OK_INFO))
        real = libc_recvmmsg()
        calls = 0

        def overrun_twice(fd: int, headers: object, slots: int, flags: int, timeout: object) -> int:
            nonlocal calls
            calls += 1
            if calls in (3, 7):
                ctypes.set_errno(errno.ENOBUFS)
                return -1
            return real(fd, headers, slots, flags, timeout)

        receiver = BatchReceiver(reader.fileno(), call=overrun_twice)
        listener = DestroyListener(sock=reader, receiver=receiver)
        listener.update_context(frozenset({8080}), (32768, 60999), [("0.0.0.0", 8080)])
        listener.read_ready()
        result = table_of(listener.drain())
        listener.read_ready()  # closed: returns without reading its (reused) descriptor
        listener.close()
        listener.read_ready()
    assert (result.events, result.malformed, result.overruns) == (1000, 0, 2)
    got = {row.peer: row.closed["ok"] for row in result.peers}
    assert got == {"127.0.0.1:5432": 334, "127.0.0.1:5433": 333, "127.0.0.1:5434": 333}


def test_listener_stops_after_its_per_call_limit_and_the_rest_waits(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "_MAX_DATAGRAMS_PER_READ", 256)  # 4 batches of 64
    reader, writer = pair
    with reader, writer:
        for _ in range(1000):
            writer.send(destroy_message(info=OK_INFO))
        listener = DestroyListener(sock=reader)
        counts = []
        for _ in range(5):
            listener.read_ready()
            counts.append(listener.drain().events)
    assert counts == [256, 512, 768, 1000, 1000]


def test_receivers_sharing_slots_each_read_their_own_socket_in_turn() -> None:
    """Two sockets read in turn into one set of slots: each batch holds its own socket's
    datagrams, in order, up to the shared slots' count."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for which, (reader, writer) in enumerate(pairs):
            reader.setblocking(False)
            for n in range(20):
                writer.send(bytes([which]) * (1 + n))
        shared = Slots(16, 64)
        receivers = [BatchReceiver(reader.fileno(), shared=shared) for reader, _ in pairs]
        assert {(r.slots, r.slot_size) for r in receivers} == {(16, 64)}
        assert all(r.buffer is shared.buffer for r in receivers)
        got: list[list[bytes]] = [[], []]
        batches = []
        for _ in range(2):
            for which, receiver in enumerate(receivers):
                lengths = receiver.receive()
                batches.append(len(lengths))
                view = shared.buffer
                got[which] += [bytes(view[i * 64 : i * 64 + n]) for i, n in enumerate(lengths)]
        assert batches == [16, 16, 4, 4]
        assert got == [[bytes([which]) * (1 + n) for n in range(20)] for which in (0, 1)]
    finally:
        for reader, writer in pairs:
            reader.close()
            writer.close()


def test_listeners_sharing_the_thread_slots_count_exactly() -> None:
    """DestroyListener.share: every listener given the same shared objects reads into one set
    of SHARED_SLOTS slots, made once, and each counts its own socket's events, all of them."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(3)]
    shared: dict[str, object] = {}
    try:
        listeners = []
        for which, (reader, writer) in enumerate(pairs):
            reader.setblocking(False)
            writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            for n in range(300 + which * 100):
                writer.send(destroy_message(sport=40000 + n, dport=5432 + which, info=OK_INFO))
            listener = DestroyListener(sock=reader)
            listener.share(shared)
            listeners.append(listener)
        (slots,) = shared.values()
        assert isinstance(slots, Slots) and slots.count == SHARED_SLOTS
        assert all(listener._receiver.buffer is slots.buffer for listener in listeners)
        for listener in listeners:  # in turn, as the gathering thread reads them
            listener.read_ready()
        results = [table_of(listener.drain()) for listener in listeners]
        for listener in listeners:
            listener.close()
    finally:
        for reader, writer in pairs:
            reader.close()
            writer.close()
    assert [(r.events, r.malformed) for r in results] == [(300, 0), (400, 0), (500, 0)]
    assert [{row.peer: row.closed["ok"] for row in r.peers} for r in results] == [
        {f"127.0.0.1:{5432 + which}": 300 + which * 100} for which in range(3)
    ]
