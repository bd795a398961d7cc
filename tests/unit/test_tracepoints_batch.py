"""The batch parser (RingBuffer.take, SpanParser, RecordReader.handle_spans) against the
per-record path (RingBuffer.collect, RecordReader.handle) on the same records: the same calls on
the tracker, in the same order, the same counts; in rings laid out like perf's (a memfd), one of
them wrapped around its end."""

from __future__ import annotations

import dataclasses
import mmap
import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpwatch.paths import ProcPaths
from tcpwatch.sources import perf
from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.tracepoints_batch import GENERIC, TIME_ITEM, SpanParser
from tcpwatch.sources.tracepoints_records import RecordReader
from tcpwatch.sources.tracepoints_tasks import TaskResolver
from tcpwatch.sources.tracepoints_tracker import SOCKET_LIMIT, Tracker

from .tracepoint_records import (
    SOFTIRQ,
    comm,
    fixture_events,
    fork,
    lost,
    namespaces,
    sample,
    sockaddr,
    v4,
    v6,
)

CHOSEN = fixture_events()
F = CHOSEN.formats
S = CHOSEN.states
PAGE = mmap.PAGESIZE
NS = 4026532001


class Ring:
    """A memfd shaped like a perf mapping (metadata page, then 2^n data pages)."""

    def __init__(self, data_pages: int, start: int = 0) -> None:
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, (1 + data_pages) * PAGE)
        self.size = data_pages * PAGE
        self.map = mmap.mmap(self.fd, (1 + data_pages) * PAGE)
        struct.pack_into("=QQQQ", self.map, 1024, start, start, PAGE, self.size)
        self.head = start

    def write(self, record: bytes) -> None:
        at = self.head % self.size
        first = min(len(record), self.size - at)
        self.map[PAGE + at : PAGE + at + first] = record[:first]
        rest = len(record) - first
        self.map[PAGE : PAGE + rest] = record[first:]
        self.head += len(record)
        struct.pack_into("=Q", self.map, 1024, self.head)

    def rewind(self, tail: int) -> None:
        """Unread everything again from ``tail`` (the same bytes for the second path)."""
        struct.pack_into("=Q", self.map, 1032, tail)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Recording(Tracker):
    """A tracker that writes down every call the reader makes (``ended`` is the end state of
    ``sockets``: the batch path pops a socket's end inline)."""

    def __init__(self, tasks: TaskResolver, socket_limit: int = SOCKET_LIMIT) -> None:
        super().__init__(tasks, S, CHOSEN.drop_reasons, CHOSEN.reset_reasons, socket_limit)
        self.calls: list[tuple[Any, ...]] = []

    def set_state(self, *args: Any) -> None:
        self.calls.append(("set_state", *args))
        super().set_state(*args)

    def connecting(self, *args: Any) -> None:
        self.calls.append(("connecting", *args))
        super().connecting(*args)

    def established(self, *args: Any) -> None:
        self.calls.append(("established", *args))
        super().established(*args)

    def error_report(self, *args: Any) -> None:
        self.calls.append(("error_report", *args))
        super().error_report(*args)

    def retransmit(self, sk: int) -> None:
        self.calls.append(("retransmit", sk))
        super().retransmit(sk)

    def send_reset(self, *args: Any) -> None:
        self.calls.append(("send_reset", *args))
        super().send_reset(*args)

    def receive_reset(self, *args: Any) -> None:
        self.calls.append(("receive_reset", *args))
        super().receive_reset(*args)

    def drop(self, *args: Any) -> None:
        self.calls.append(("drop", *args))
        super().drop(*args)


def reader(
    tmp_path: Path, polled: bool = False, socket_limit: int = SOCKET_LIMIT
) -> tuple[RecordReader, Recording]:
    """A reader on a recording tracker; ``polled``: told the namespace is polled before any
    record (its connects rows are then counted as the records come)."""
    tracker = Recording(TaskResolver(ProcPaths(str(tmp_path))), socket_limit)
    if polled:
        tracker.update_contexts({}, [NS])
    return RecordReader(CHOSEN, tracker), tracker


def _state(
    t: int, pid: int, sk: int, old: int, new: int, port: int, six: bool = False,
    flags: int | None = None, tid: int | None = None,
) -> bytes:  # fmt: skip
    """A set_state sample: ``port`` is the client's (to port 8080), or below 8000 the
    destination's (from port 40000); a connect's start or listen is written by its task, the
    rest in softirq, unless ``flags`` says otherwise."""
    family = events.AF_INET6 if six else events.AF_INET
    addresses: dict[str, int | bytes] = (
        {"saddr_v6": v6("fd00::1"), "daddr_v6": v6("fd00::2")}
        if six
        else {"saddr": v4("127.0.0.1"), "daddr": v4("127.0.0.2")}
    )
    if flags is None:
        flags = 0 if new in (S.syn_sent, S.listen) else SOFTIRQ
    sport, dport = (40000, port) if port < 8000 else (port, 8080)
    record = sample(
        F[events.SET_STATE], t, pid, tid, flags=flags, skaddr=sk, oldstate=old, newstate=new,
        sport=sport, dport=dport, family=family, protocol=6, **addresses,
    )  # fmt: skip
    return bytes(record[4])


def cpu_records(cpu: int, connections: int, seed: int) -> Iterator[bytes]:
    """One CPU's records in time order: connects (some by a second thread of the process),
    ends of sockets of other CPUs, a listener, failures with their error reports, resets,
    drops, retransmits and side-band records, with reused socket addresses (the next connect
    takes a freed one)."""
    chance = random.Random(seed)
    t = 1_000_000 + cpu * 7  # the CPUs' times interleave
    pid = 600 + cpu
    thread = 70_000 + cpu  # a thread id other than the pid: the two are never mixed up
    yield from (bytes(r[4]) for r in (fork(t, pid, 1), namespaces(t + 1, pid, NS)))
    yield bytes(comm(t + 2, pid, f"client{cpu}")[4])
    yield bytes(fork(t + 3, pid, pid, thread, pid)[4])
    yield bytes(namespaces(t + 4, pid, NS, thread)[4])
    t += 100
    yield _state(t, pid, 0xA000 + cpu, S.close, S.listen, 9000 + cpu)
    for number in range(connections):
        t += 1000
        sk = 0xF000 + (number % 5) * 0x100 + cpu  # five addresses, reused in turn
        port = 40000 + number
        six = chance.random() < 0.2
        yield _state(t, pid, sk, S.close, S.syn_sent, port, six, tid=thread if number % 4 else pid)
        turn = chance.random()
        if turn < 0.1:  # refused: the close, then its error report
            yield _state(t + 10, 0, sk, S.syn_sent, S.close, port, six)
            yield bytes(
                sample(
                    F[events.ERROR_REPORT], t + 11, 0, flags=SOFTIRQ, error=111, sport=port,
                    dport=8080, family=events.AF_INET, protocol=6, saddr=v4("127.0.0.1"),
                    daddr=v4("127.0.0.2"),
                )[4]
            )  # fmt: skip
            continue
        if turn < 0.15:
            yield bytes(
                sample(F[events.RETRANSMIT], t + 5, 0, flags=SOFTIRQ, skaddr=sk, state=2)[4]
            )
        yield _state(t + 20, 0, sk, S.syn_sent, S.established, port, six)
        if turn > 0.9:
            yield bytes(
                sample(
                    F[events.RECEIVE_RESET], t + 25, 0, flags=SOFTIRQ, skaddr=sk, sport=port,
                    dport=8080, family=events.AF_INET, saddr=v4("127.0.0.1"),
                    daddr=v4("127.0.0.2"),
                )[4]
            )  # fmt: skip
        if 0.8 < turn <= 0.9:
            reason = F[events.SEND_RESET].value_of("reason", "NOT_SPECIFIED")
            yield bytes(
                sample(
                    F[events.SEND_RESET], t + 25, pid, skaddr=sk, reason=reason,
                    saddr=sockaddr("127.0.0.1", port), daddr=sockaddr("127.0.0.2", 8080),
                )[4]
            )  # fmt: skip
        if 0.7 < turn <= 0.8:
            reason = F[events.KFREE_SKB].value_of("reason", "TCP_ZEROWINDOW")
            yield bytes(
                sample(F[events.KFREE_SKB], t + 26, 0, flags=SOFTIRQ, rx_sk=sk, reason=reason)[4]
            )
        yield _state(t + 30, 0, sk + 0x10000, 8, S.close, 8080)  # the server's end
        yield _state(t + 40, 0, sk, 5, S.close, port, six)  # the client's end
        if number % 13 == 5:  # a connect of a task the reader never saw (/proc: gone)
            yield _state(t + 50, 999, 0xE000 + cpu, S.close, S.syn_sent, port, six)
            yield _state(t + 60, 0, 0xE000 + cpu, S.syn_sent, S.established, port, six)
            yield _state(t + 70, 0, 0xE000 + cpu, 1, S.close, port, six)
        if number % 17 == 3:  # one written in an interrupt (not the task's)
            yield _state(t + 50, pid, 0xE100 + cpu, S.close, S.syn_sent, port, six, SOFTIRQ)
            yield _state(t + 60, 0, 0xE100 + cpu, 1, S.close, port, six)
        if number % 23 == 11:  # its connect's end never arrives: seen closing from LAST_ACK
            yield _state(t + 50, pid, 0xE300 + cpu, S.close, S.syn_sent, port, six)
            yield _state(t + 70, 0, 0xE300 + cpu, 9, S.close, port, six)
        if number % 19 == 7:  # to a destination of its own (a label made once, then known)
            yield _state(t + 50, pid, 0xE200 + cpu, S.close, S.syn_sent, 7000 + number % 3)
            yield _state(t + 60, 0, 0xE200 + cpu, S.syn_sent, S.established, 7000 + number % 3)
            yield _state(t + 70, 0, 0xE200 + cpu, 1, S.close, 7000 + number % 3)
    yield bytes(lost(t + 50, 3)[4])
    yield _state(t + 60, pid, 0xA000 + cpu, S.listen, S.close, 9000 + cpu)


@pytest.fixture
def rings() -> Iterator[list[Ring]]:
    made: list[Ring] = []
    yield made
    for ring in made:
        ring.close()


def _fill(rings: list[Ring], connections: int, wrap_at: int) -> None:
    """Two CPUs' rings; the second starts ``wrap_at`` bytes before its end, so its records
    wrap around (a record may be cut anywhere, its header too)."""
    for cpu in range(2):
        size_pages = 64
        start = size_pages * PAGE - wrap_at if cpu == 1 else 0
        ring = Ring(size_pages, start)
        rings.append(ring)
        for record in cpu_records(cpu, connections, seed=cpu + 1):
            ring.write(record)


INLINE = ("connecting", "established")  # the batch path's common cases of these are inline


def _outcome(read: RecordReader, tracker: Recording) -> tuple[Any, ...]:
    """The calls but those the batch path may make inline, every followed socket as it is
    followed, what was not attributed and why, the tasks looked up, and the drain."""
    tracker.update_contexts({}, [NS])
    host = read.host(2, 4096)
    return (
        [call for call in tracker.calls if call[0] not in INLINE],
        dict(tracker.sockets),
        dict(tracker.unattributed),
        tracker.other_netns,
        (tracker.tasks.lookups, tracker.tasks.gone),
        host,
        tracker.stats([NS], host),
    )


def _inline(tracker: Recording) -> int:
    return sum(call[0] in INLINE for call in tracker.calls)


@pytest.mark.parametrize(
    ("wrap_at", "polled", "socket_limit"),
    [
        (3, False, SOCKET_LIMIT),
        (8, True, SOCKET_LIMIT),
        (100, True, SOCKET_LIMIT),
        (4096 + 17, False, SOCKET_LIMIT),
        (100, True, 3),  # the table fills: connects not followed, counted
    ],
)
def test_the_batch_path_makes_the_same_calls_as_the_per_record_path(
    tmp_path: Path, rings: list[Ring], wrap_at: int, polled: bool, socket_limit: int
) -> None:
    _fill(rings, connections=300, wrap_at=wrap_at)
    tails = [int(struct.unpack_from("=Q", ring.map, 1032)[0]) for ring in rings]
    one, one_tracker = reader(tmp_path, polled, socket_limit)
    records: list[perf.Record] = []
    buffers = [perf.RingBuffer(ring.fd, 64) for ring in rings]
    ends = [buffer.collect(records) for buffer in buffers]
    assert any(isinstance(record[4], bytes) for record in records)  # a wrapped record's copy
    one.handle(records)
    for buffer, end in zip(buffers, ends, strict=True):
        buffer.release(end)
    for ring, tail in zip(rings, tails, strict=True):
        ring.rewind(tail)
    batch, batch_tracker = reader(tmp_path, polled, socket_limit)
    batch.handle_spans([buffer.take() for buffer in buffers])
    assert all(buffer.pending() == 0 for buffer in buffers)  # taken: the space is given back
    for buffer in buffers:
        buffer.close()
    inline_calls = (_inline(one_tracker), _inline(batch_tracker))
    expected = _outcome(one, one_tracker)
    got = _outcome(batch, batch_tracker)
    assert len(expected[0]) > 300  # the records reached the tracker
    assert got == expected
    assert batch.host(2, 4096).records["set_state"] == one.host(2, 4096).records["set_state"]
    # Both ways through the inline cases were taken: their methods for the rest
    assert 0 < inline_calls[1] < inline_calls[0]
    unattributed = expected[2]
    assert {"interrupt", "task_exited", "connect_end_unseen"} <= {why for _, why in unattributed}
    if socket_limit < SOCKET_LIMIT:
        assert unattributed[("set_state", "table_full")] > 100


def test_a_run_ends_at_the_first_record_of_another_kind() -> None:
    """Runs of set_state samples are parsed whole; everything else is left to the per-record
    path, in ring order, and a corrupt size is an error."""
    parser = SpanParser(F[events.SET_STATE])
    state = _state(5, 1, 0xF0, S.close, S.syn_sent, 40000)
    other = bytes(fork(6, 2, 1)[4])
    span = state * 3 + other + state * 20
    items: list[tuple[Any, ...]] = []
    assert parser.split(span, items) == 23
    pids = [item[0] for item in items]  # a GENERIC record's first item is GENERIC
    assert pids == [1] * 3 + [GENERIC] + [1] * 20
    assert items[3][1:5] == (perf.PERF_RECORD_FORK, 6, 3 * len(state), len(other))
    assert items[3][5:] == (GENERIC, GENERIC, span)
    assert [item[TIME_ITEM] for item in items] == [5] * 3 + [6] + [5] * 20
    corrupt = bytearray(state)
    struct.pack_into("=H", corrupt, 6, 4)
    with pytest.raises(perf.PerfError):
        parser.split(bytes(corrupt), [])


def _changed(record: bytes, at: int, value: int) -> bytes:
    """``record`` with the byte at ``at`` set to ``value``."""
    return record[:at] + bytes([value]) + record[at + 1 :]


@pytest.mark.parametrize(
    ("odd", "generic"),
    [
        pytest.param(lambda r: _changed(r, 0, perf.PERF_RECORD_LOST), True, id="type"),
        pytest.param(lambda r: _changed(r, 3, 1), True, id="type-high-byte"),
        pytest.param(
            lambda r: _changed(r, perf.RAW_OFFSET, r[perf.RAW_OFFSET] ^ 1), True, id="event"
        ),
        pytest.param(
            lambda r: _changed(r, perf.RAW_OFFSET + 1, r[perf.RAW_OFFSET + 1] ^ 1),
            True,
            id="event-high-byte",
        ),
        # a set_state sample 8 bytes longer: a run of its own
        pytest.param(lambda r: _changed(r, 6, len(r) + 8) + bytes(8), False, id="longer"),
    ],
)
@pytest.mark.parametrize("at", [0, 1, 63, 64, 65, 200, 299])
def test_a_run_ends_where_a_record_differs_in_type_size_or_event(
    odd: Callable[[bytes], bytes], generic: bool, at: int
) -> None:
    """The run's columns (type, size, event bytes) end it at the first record that differs
    in any of them, wherever it falls in a chunk; the rest is parsed as before."""
    parser = SpanParser(F[events.SET_STATE])
    records = [_state(10 + i, 1, 0xF0 + i, S.close, S.syn_sent, 40000) for i in range(300)]
    records[at] = odd(records[at])
    items: list[tuple[Any, ...]] = []
    assert parser.split(b"".join(records), items) == 300 - generic
    assert [item[0] == GENERIC for item in items] == [generic and i == at for i in range(300)]
    parsed = [(item[TIME_ITEM], item[4]) for item in items if item[0] != GENERIC]
    assert parsed == [(10 + i, 0xF0 + i) for i in range(300) if not generic or i != at]


def test_a_set_state_layout_it_does_not_know_takes_the_per_record_path() -> None:
    fmt = F[events.SET_STATE]
    moved = {**fmt.fields, "saddr": dataclasses.replace(fmt.fields["saddr"], offset=0)}
    parser = SpanParser(dataclasses.replace(fmt, fields=moved))
    items: list[tuple[Any, ...]] = []
    assert parser.split(_state(5, 1, 0xF0, S.close, S.syn_sent, 40000), items) == 0
    assert [item[0] for item in items] == [GENERIC]


def _late_end_of_a_reused_address(tmp_path: Path, first_horizon: int | None) -> Recording:
    """CPU A's ring, taken first, has a new connect at address X (time 110); CPU B's end of the
    old socket at X (time 100) is written after A's ring was taken, so it comes a read later."""
    batch, tracker = reader(tmp_path)
    pid, x = 700, 0xF100
    task = b"".join(bytes(r[4]) for r in (fork(10, pid, 1), namespaces(11, pid, NS)))
    task += bytes(comm(12, pid, "client")[4])
    batch.handle_spans([task + _state(110, pid, x, S.close, S.syn_sent, 40000), b""], first_horizon)
    batch.handle_spans([b"", _state(100, 0, x, 5, S.close, 39999)], 150)
    return tracker


def test_records_after_the_horizon_wait_for_the_next_read(tmp_path: Path) -> None:
    held = _late_end_of_a_reused_address(tmp_path, 105)
    assert 0xF100 in held.sockets  # the old end came first: the new connect is still followed
    assert [call[:2] for call in held.calls] == [("connecting", 700)]  # the end is inline
    # Handled as taken, the newer record first, the late end forgets the new connect.
    unordered = _late_end_of_a_reused_address(tmp_path, None)
    assert 0xF100 not in unordered.sockets


def _long_run_records(cpu: int, connections: int) -> list[bytes]:
    """One CPU's records in time order, in long runs of set_state samples (few other records):
    connects and their ends, the server's ends (nobody follows them), connections that last
    across reads, connects that began before the reader, refused connects in interrupts."""
    t = 1_000_000 + cpu * 7
    pid = 600 + cpu
    made = [
        bytes(r[4]) for r in (fork(t, pid, 1), namespaces(t + 1, pid, NS), comm(t + 2, pid, "c"))
    ]
    late: list[tuple[int, bytes]] = []  # the ends of long connections, at their time
    for number in range(connections):
        t += 1000
        while late and late[0][0] < t:
            made.append(late.pop(0)[1])
        sk = 0xF000 + (number % 5) * 0x100 + cpu
        port = 40000 + number
        if number % 9 == 4:  # lasts about 40 connections: its end comes reads later
            sk = 0xC000 + number * 0x100 + cpu
            made += [
                _state(t, pid, sk, S.close, S.syn_sent, port),
                _state(t + 20, 0, sk, S.syn_sent, S.established, port),
            ]
            late.append((t + 40_500, _state(t + 40_500, 0, sk, 4, S.close, port)))
            continue
        made += [
            _state(t, pid, sk, S.close, S.syn_sent, port),
            _state(t + 20, 0, sk, S.syn_sent, S.established, port),
            _state(t + 30, 0, sk + 0x10000, 8, S.close, 8080),  # the server's end
            _state(t + 40, 0, sk, 5, S.close, port),
        ]
        if number % 7 == 2:  # began before the reader: its handshake's end is counted
            made += [
                _state(t + 50, 0, 0xD000 + number * 0x100, S.syn_sent, S.established, port),
                _state(t + 60, 0, 0xD000 + number * 0x100, 4, S.close, port),
            ]
        if number % 13 == 6:  # began before the reader and refused: its close is counted
            made.append(_state(t + 70, 0, 0xD800 + number * 0x100, S.syn_sent, S.close, port))
        if number % 100 == 50:  # a listener, closed a connection later
            made.append(_state(t + 80, pid, 0xA000 + number * 0x100, S.close, S.listen, 9000))
        if number % 100 == 51:
            made.append(_state(t + 80, 0, 0xA000 + (number - 1) * 0x100, S.listen, S.close, 9000))
        if number % 11 == 3:  # refused, in an interrupt: never followed, its close counted
            made += [
                _state(t + 50, pid, 0xE400 + cpu, S.close, S.syn_sent, port, flags=SOFTIRQ),
                _state(t + 60, 0, 0xE400 + cpu, S.syn_sent, S.close, port),
            ]
    return made  # the last long connections are still open


def _time_of(record: bytes) -> int:
    """A sample's time, or a side-band record's (its sample_id trailer's, at its end)."""
    kind, _, size = perf.RECORD_HEADER.unpack_from(record)
    return int(
        struct.unpack_from("=Q", record, 16 if kind == perf.PERF_RECORD_SAMPLE else size - 8)[0]
    )


def test_reads_with_horizons_make_the_same_calls_as_the_per_record_path(
    tmp_path: Path, rings: list[Ring]
) -> None:
    """The records of two CPUs read in ten takes, each with a horizon inside what the rings
    hold (the records past it are held), against the per-record path on all of them at once:
    long runs of set_state samples, sockets followed across reads, the same outcome."""
    records = [_long_run_records(cpu, 400) for cpu in range(2)]
    one, one_tracker = reader(tmp_path)
    collected: list[perf.Record] = []
    for cpu_records_ in records:
        for record in cpu_records_:
            size = struct.unpack_from("=H", record, 6)[0]
            kind = struct.unpack_from("=I", record, 0)[0]
            collected.append((_time_of(record), 0, kind, size, record))
    one.handle(collected)
    batch, batch_tracker = reader(tmp_path)
    rings += [Ring(64), Ring(64)]
    buffers = [perf.RingBuffer(ring.fd, 64) for ring in rings]
    written = [0, 0]
    end = 1_000_000 + 400 * 1000 + 50_000
    for turn in range(1, 11):
        horizon = 1_000_000 + turn * 40_000
        for cpu, ring in enumerate(rings):  # up to a little past the horizon
            while written[cpu] < len(records[cpu]) and (
                _time_of(records[cpu][written[cpu]]) < horizon + 3_000 or turn == 10
            ):
                ring.write(records[cpu][written[cpu]])
                written[cpu] += 1
        batch.handle_spans([buffer.take() for buffer in buffers], horizon if turn < 10 else end)
    batch.handle_spans([buffer.take() for buffer in buffers])
    for buffer in buffers:
        buffer.close()
    assert written == [len(r) for r in records]
    expected, got = _outcome(one, one_tracker), _outcome(batch, batch_tracker)
    assert got == expected
    assert {"connect_unseen", "interrupt"} <= {why for _, why in expected[2]}
    assert len(expected[1]) > 3  # sockets still followed at the end
