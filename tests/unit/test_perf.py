"""perf_event_open's attr, the ring buffer's reading (over a memfd laid out like perf's mapping:
a metadata page, then the data area) and the CPU list; the real syscall is exercised by the
integration tests."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpwatch.sources import perf

PAGE = mmap.PAGESIZE


class FakeRing:
    """A memfd shaped like a perf mapping with 2 data pages; records written at ``head``."""

    def __init__(self, data_pages: int = 2) -> None:
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, (1 + data_pages) * PAGE)
        self.size = data_pages * PAGE
        self.map = mmap.mmap(self.fd, (1 + data_pages) * PAGE)
        struct.pack_into("=QQQQ", self.map, 1024, 0, 0, PAGE, self.size)
        self.head = 0

    def write(self, kind: int, body: bytes) -> None:
        size = 8 + len(body)
        record = struct.pack("=IHH", kind, 0, size) + body
        for i, byte in enumerate(record):
            self.map[PAGE + (self.head + i) % self.size] = byte
        self.head += size
        struct.pack_into("=Q", self.map, 1024, self.head)

    @property
    def tail(self) -> int:
        value: int = struct.unpack_from("=Q", self.map, 1032)[0]
        return value

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def ring() -> Iterator[FakeRing]:
    made = FakeRing()
    yield made
    made.close()


def sample_body(time_ns: int, payload: bytes) -> bytes:
    return struct.pack("=IIQI", 7, 8, time_ns, len(payload)) + payload


def test_the_attr_asks_for_one_sample_per_event_on_the_monotonic_clock() -> None:
    attr = perf.encode_attr(perf.PERF_TYPE_TRACEPOINT, 2287)
    kind, size, config, period, sample_type, _, flags, wakeup = struct.unpack_from(
        "=IIQQQQQI", attr
    )
    assert (kind, size, config, period, len(attr)) == (2, 128, 2287, 1, 128)
    assert sample_type == perf.PERF_SAMPLE_TID | perf.PERF_SAMPLE_TIME | perf.PERF_SAMPLE_RAW
    assert flags & 1 and flags & (1 << 25) and flags & (1 << 18)  # disabled, clockid, id_all
    assert not flags & (1 << 13)  # no task records unless asked
    assert wakeup == 1
    assert struct.unpack_from("=i", attr, 92)[0] == 1  # CLOCK_MONOTONIC
    counted = perf.encode_attr(perf.PERF_TYPE_TRACEPOINT, 2287, count_lost=True)
    assert struct.unpack_from("=Q", counted, 32)[0] == perf.PERF_FORMAT_LOST  # read_format
    assert struct.unpack_from("=Q", attr, 32)[0] == 0
    sideband = perf.encode_attr(1, 9, sample_type=0, task_events=True)
    flags = struct.unpack_from("=Q", sideband, 40)[0]
    assert flags & (1 << 13) and flags & (1 << 9) and flags & (1 << 28)  # task, comm, namespaces


def test_other_architectures_are_refused_with_a_reason() -> None:
    assert perf.syscall_number("x86_64") == 298
    assert perf.syscall_number("aarch64") == 241
    with pytest.raises(perf.PerfError, match="not wired for architecture 'riscv64'"):
        perf.syscall_number("riscv64")


def test_records_are_collected_in_place_and_their_space_released(ring: FakeRing) -> None:
    ring.write(perf.PERF_RECORD_SAMPLE, sample_body(100, b"abcd"))
    ring.write(perf.PERF_RECORD_LOST, struct.pack("=QQIIQ", 1, 5, 0, 0, 200))
    reader = perf.RingBuffer(ring.fd, 2)
    try:
        records: list[perf.Record] = []
        end = reader.collect(records)
        assert [(t, kind, size) for t, _, kind, size, _ in records] == [
            (100, perf.PERF_RECORD_SAMPLE, 32),
            (200, perf.PERF_RECORD_LOST, 40),
        ]
        _, offset, _, _, buffer = records[0]
        assert isinstance(buffer, mmap.mmap) and offset == PAGE  # read where it lies
        assert bytes(buffer[offset + perf.RAW_OFFSET : offset + perf.RAW_OFFSET + 4]) == b"abcd"
        assert ring.tail == 0  # not released until handled
        reader.release(end)
        assert ring.tail == ring.head == 72
        assert reader.collect([]) == 72
    finally:
        reader.close()


@pytest.mark.parametrize("room", [32, 20, 4], ids=["body wraps", "time wraps", "header wraps"])
def test_a_record_that_wraps_around_is_copied_whole(ring: FakeRing, room: int) -> None:
    filler = sample_body(1, bytes(ring.size - room - 28))  # leaves ``room`` bytes at the end
    ring.write(perf.PERF_RECORD_SAMPLE, filler)
    reader = perf.RingBuffer(ring.fd, 2)
    try:
        reader.release(reader.collect([]))
        payload = bytes(range(40))
        ring.write(perf.PERF_RECORD_SAMPLE, sample_body(2, payload))
        records: list[perf.Record] = []
        reader.collect(records)
        ((time_ns, offset, kind, size, buffer),) = records
        assert (time_ns, offset, kind, size) == (2, 0, perf.PERF_RECORD_SAMPLE, 68)
        assert isinstance(buffer, bytes)
        assert buffer[perf.RAW_OFFSET : perf.RAW_OFFSET + 40] == payload
    finally:
        reader.close()


def test_a_corrupt_record_size_is_an_error_not_a_loop(ring: FakeRing) -> None:
    struct.pack_into("=IHH", ring.map, PAGE, perf.PERF_RECORD_SAMPLE, 0, 4)
    struct.pack_into("=Q", ring.map, 1024, 8)
    reader = perf.RingBuffer(ring.fd, 2)
    try:
        with pytest.raises(perf.PerfError, match="corrupt ring buffer"):
            reader.collect([])
    finally:
        reader.close()


def test_data_pages_must_be_a_power_of_two(ring: FakeRing) -> None:
    with pytest.raises(ValueError, match="power of two"):
        perf.RingBuffer(ring.fd, 3)


def test_online_cpus_are_read_from_sysfs_ranges(tmp_path: Path) -> None:
    online = tmp_path / "online"
    online.write_text("0-1,4,6-7\n")
    assert perf.online_cpus(str(online)) == (0, 1, 4, 6, 7)
    online.write_text("zero\n")
    with pytest.raises(perf.PerfError, match="online CPUs"):
        perf.online_cpus(str(online))


def test_the_default_ring_spreads_8_mib_over_the_cpus_at_least_512_kib_each() -> None:
    from tcpwatch.sources.tracepoints import ring_pages

    assert ring_pages(0, 2) * PAGE == 4 << 20
    assert ring_pages(0, 4) * PAGE == 2 << 20
    assert ring_pages(0, 64) * PAGE == 512 << 10
    assert ring_pages(3 << 20, 2) * PAGE == 2 << 20  # a size set: a power of two at most it
    assert ring_pages(100, 2) == 1
