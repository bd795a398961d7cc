"""The reader's hot path: a ring's records parsed a run at a time instead of one call each.

``sock:inet_sock_set_state`` is most of what the rings hold (about four records per loopback
connection) and, for one sample_type, every one of its samples has the same size. So where a
span of the ring (one copy, perf.RingBuffer.take) holds a run of them, one ``iter_unpack`` of a
Struct covering the whole sample (pid, tid, time, then the raw fields the tracker reads) parses
the run in C, a tuple per record. A run is found a chunk at a time before it is parsed: the
bytes of the records' type, size and event number are read as columns (a strided slice each)
and the run ends at the first record where one differs from the run's first (the chunk grows
while runs go on, and starts small again after one ends, so a ring of mixed records costs a
few columns of bytes per run, never a tuple that is thrown away). Every other record is
listed as ``GENERIC`` for the per-record path. Records of several rings are put in time order
as RecordReader.handle orders them (a stable sort on the time, ring by ring).

tests/unit/test_tracepoints_batch.py holds this path to the per-record one on the same records.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from tcpwatch.sources import perf
from tcpwatch.sources.tracefs import EventFormat, TracefsError

GENERIC = -1  # first item of a record left to the per-record path
# header (type, misc, size: skipped, a run's are checked by columns), pid, tid, time, raw size
# (skipped): 28 bytes
_SAMPLE_HEAD = "=8xIIQ4x"
# Read as numbers: what every record needs (a socket's end and a connect's end need no more).
# The rest, from sport to the last address (sport, dport, family, saddr, daddr, saddr_v6,
# daddr_v6), follows as one bytes object, read (``ports``, ``addresses``) only for the records
# that need it: a number the tuple does not hold is one object fewer to make per record.
STATE_FIELDS = ("common_flags", "skaddr", "oldstate", "newstate")
PORT_FIELDS = ("sport", "dport", "family")
ADDRESS_FIELDS = ("saddr", "daddr", "saddr_v6", "daddr_v6")
DESTINATION_FIELDS = ("dport", "family", "daddr", "daddr_v6")
# A set_state tuple: 0 pid, 1 tid, 2 time, 3 flags, 4 skaddr, 5 oldstate, 6 newstate, 7 the
# rest's bytes. A GENERIC tuple has as many items, so the loop unpacks both alike: (GENERIC,
# type, time, offset, size, GENERIC, GENERIC, span); GENERIC is no pid and no state, so the
# checks of a socket's end and a connect's end pass it by. The time is item 2 of both.
TIME_ITEM = 2
_HEADER = perf.RECORD_HEADER.unpack_from
_EVENT = struct.Struct("=H").unpack_from
_TIME = struct.Struct("=Q").unpack_from
_SAMPLE_TIME = 16  # header, pid, tid, then the time
# The bytes of a record a run's records must share: the header's type (u32) and size (u16),
# the raw record's event number (common_type, u16 at RAW_OFFSET)
_KEY_BYTES = (0, 1, 2, 3, 6, 7, perf.RAW_OFFSET, perf.RAW_OFFSET + 1)


FIRST_CHUNK = 64
LAST_CHUNK = 1024
Parsed = tuple[Any, ...]
_Run = tuple[struct.Struct, tuple[bytes, ...]]  # a sample size's Struct, its run's columns


class SpanParser:
    """Splits one ring's span into set_state tuples and GENERIC records, in ring order."""

    def __init__(self, state_format: EventFormat) -> None:
        self.event = state_format.id
        self.addresses: tuple[slice, ...] | None = None
        self.destination = slice(0)
        # (sport, dport, family) of a tuple's rest; set with the addresses (only then are runs
        # parsed, so the default is never called)
        self.ports: Callable[[bytes], tuple[Any, ...]] = struct.Struct("").unpack_from
        self._raw: str | None = None
        try:
            numbers = state_format.unpacker(STATE_FIELDS)
            start = state_format.field(PORT_FIELDS[0]).offset
            if start < numbers.size:
                raise TracefsError(f"{state_format.title}: ports before the numbers")
            self.ports = state_format.unpacker(PORT_FIELDS, base=start).unpack_from
            for name in ADDRESS_FIELDS:  # each after the ports
                state_format.unpacker((PORT_FIELDS[-1], name), base=start)
        except TracefsError:
            return  # a layout this parser does not know: every record takes the per-record path
        end = max(field.offset + field.size for field in map(state_format.field, ADDRESS_FIELDS))
        self._raw = f"{numbers.format.lstrip('=')}{start - numbers.size}x{end - start}s"
        self.addresses = tuple(
            slice(field.offset - start, field.offset - start + field.size)
            for field in (state_format.field(name) for name in ADDRESS_FIELDS)
        )
        # The bytes of the rest that name a connect's destination (dport, family, daddr,
        # daddr_v6, and what lies between): a key for its label with no field read.
        named = [state_format.field(name) for name in DESTINATION_FIELDS]
        self.destination = slice(
            min(field.offset for field in named) - start,
            max(field.offset + field.size for field in named) - start,
        )
        self._wide: dict[int, _Run | None] = {}

    def _struct(self, size: int) -> _Run | None:
        """The Struct of a whole set_state sample of ``size`` bytes and the columns of a run
        of them (_KEY_BYTES' values, LAST_CHUNK times each); None: it would not fit."""
        if size not in self._wide:
            body = f"{_SAMPLE_HEAD}{self._raw}"
            used = struct.calcsize(body)
            if used > size:
                self._wide[size] = None
            else:
                head = perf.RECORD_HEADER.pack(perf.PERF_RECORD_SAMPLE, 0, size)
                head += bytes(perf.RAW_OFFSET - len(head)) + struct.pack("=H", self.event)
                columns = tuple(head[at : at + 1] * LAST_CHUNK for at in _KEY_BYTES)
                self._wide[size] = (struct.Struct(f"{body}{size - used}x"), columns)
        return self._wide[size]

    @staticmethod
    def _run_length(
        span: bytes, start: int, count: int, size: int, columns: tuple[bytes, ...]
    ) -> int:
        """How many of the ``count`` records of ``size`` bytes from ``start`` are set_state
        samples of that size: per byte of their type, size and event number, one strided slice
        (a column of the records' bytes) compared with what it must be, in C; where it differs,
        the length of its prefix that does not."""
        stop = start + count * size
        for at, expected in zip(_KEY_BYTES, columns, strict=True):
            column = span[start + at : stop : size]
            if not expected.startswith(column):
                count -= len(column.lstrip(expected[:1]))
                stop = start + count * size
        return count

    def split(self, span: bytes, out: list[Parsed]) -> int:
        """Append every record of ``span`` (whole records, ring order) to ``out``; returns how
        many were set_state samples parsed in runs. PerfError on a corrupt record size."""
        end = len(span)
        view = memoryview(span)
        event = self.event
        sample = perf.PERF_RECORD_SAMPLE
        raw_offset = perf.RAW_OFFSET
        append, extend = out.append, out.extend
        chunk = FIRST_CHUNK
        parsed_total = 0
        position = 0
        while position < end:
            kind, _, size = _HEADER(span, position)
            if size < 8 or position + size > end:
                raise perf.PerfError(f"corrupt ring buffer: a record of {size} bytes")
            if (
                kind == sample
                and size >= raw_offset + 2
                and _EVENT(span, position + raw_offset)[0] == event
            ):
                known = self._struct(size) if self._raw is not None else None
                if known is not None:
                    wide, columns = known
                    most = min(chunk, (end - position) // size)
                    count = self._run_length(span, position, most, size, columns)
                    chunk = min(chunk * 2, LAST_CHUNK) if count == most else FIRST_CHUNK
                    extend(wide.iter_unpack(view[position : position + count * size]))
                    parsed_total += count
                    position += count * size
                    continue
            if kind == sample:
                at = _TIME(span, position + _SAMPLE_TIME)[0]
            else:
                at = _TIME(span, position + size - 8)[0]
            append((GENERIC, kind, at, position, size, GENERIC, GENERIC, span))
            position += size
        return parsed_total
