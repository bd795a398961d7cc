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
import sys
from collections.abc import Callable, Mapping
from itertools import compress, repeat
from typing import Any

from tcpwatch.sources import perf
from tcpwatch.sources.tracefs import EventFormat, TracefsError
from tcpwatch.sources.tracepoints_events import TcpStates

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


SKIP_RUN = 16  # shorter runs are parsed whole (a run's columns cost about 2 us whatever its size)
FIRST_CHUNK = 64
LAST_CHUNK = 1024
Parsed = tuple[Any, ...]
_Run = tuple[struct.Struct, tuple[bytes, ...]]  # a sample size's Struct, its run's columns
# A run noted for SpanParser.parse_runs: where its tuples go in the read's list, its span, the
# first record's offset, how many, their size
Run = tuple[int, bytes, int, int, int]
_LOW = 0 if sys.byteorder == "little" else 3  # where an int's low byte is
_TIMES = _SAMPLE_TIME // 8  # the time's index in a record, in u64 words
_FLIP = bytes([1, 0]) + bytes(254)  # 0 <-> 1
_Columns = tuple[bytes, bytes, list[int]]  # a run's ends, starts (a byte a record), addresses


class SpanParser:
    """Splits one ring's span into set_state tuples and GENERIC records, in ring order."""

    def __init__(self, state_format: EventFormat, states: TcpStates | None = None) -> None:
        self.event = state_format.id
        self.skips = False  # parse_runs can leave ends out (a known layout, ``states`` given)
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
        fields = {name: state_format.field(name) for name in ("skaddr", "oldstate", "newstate")}
        if states is None or [field.size for field in fields.values()] != [8, 4, 4]:
            return
        self._skaddr, self._old, self._new = (
            perf.RAW_OFFSET + field.offset for field in fields.values()
        )
        # a state's low byte -> 1 where it is: CLOSE (an end, with the old state not SYN_SENT);
        # SYN_SENT or LISTEN (a start: the only records that make a socket followed)
        self._close = bytes(value == states.close for value in range(256))
        self._not_syn_sent = bytes(value != states.syn_sent for value in range(256))
        self._start = bytes(value in (states.syn_sent, states.listen) for value in range(256))
        self._started = (states.syn_sent, states.listen)
        self.skips = True

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

    def split(self, span: bytes, out: list[Parsed], runs: list[Run] | None = None) -> int:
        """Append every record of ``span`` (whole records, ring order) to ``out``; returns how
        many were set_state samples parsed in runs. PerfError on a corrupt record size.
        ``runs``: a run of SKIP_RUN records or more (8-byte aligned) is noted there instead, for
        :meth:`parse_runs` to parse into its place."""
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
                    if runs is not None and count >= SKIP_RUN and not (position | size) % 8:
                        runs.append((len(out), span, position, count, size))
                    else:
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

    def parse_runs(
        self,
        items: list[Parsed],
        runs: list[Run],
        followed: Mapping[int, Any],
        horizon: int | None,
    ) -> int:
        """Parse the runs ``split`` noted into their places in ``items`` (the read's records,
        the held ones first), leaving out the ends of sockets that are not ``followed`` (the
        tracker's table, as the read begins) and that no record of the read can make followed:
        handled, each would look its address up, find nothing and change nothing. Returns how
        many were left out.

        Read by columns, in C (strided slices, ``translate``, sets), before any tuple is made:
        the states' low bytes (``_columns``) and the addresses. A socket is followed only by a
        record into SYN_SENT or LISTEN, so an end is left out when its address is in no such
        record of the read (in any run, any held record), the read holds no set_state sample
        left to the per-record path, and the end is older than ``horizon`` (a later one waits
        for the next read, where a start older than it may still come). The records kept are
        unpacked one by one (``unpack_from``)."""
        noted = [self._columns(*run[1:]) for run in runs]
        started: set[int] = set()
        ends: set[int] = set()
        for end, start, addresses in noted:
            started.update(compress(addresses, start))
            ends.update(compress(addresses, end))
        for item in items:  # the held records and those left to the per-record path
            if item[0] == GENERIC:
                kind, offset, size, span = item[1], item[3], item[4], item[7]
                if (
                    kind == perf.PERF_RECORD_SAMPLE
                    and size >= perf.RAW_OFFSET + 2
                    and _EVENT(span, offset + perf.RAW_OFFSET)[0] == self.event
                ):
                    return self._parse_whole(items, runs)
            elif item[6] in self._started:
                started.add(item[4])
        gone = ends.difference(followed)
        gone -= started
        return self._parse(items, runs, noted, gone, horizon)

    def _parse_whole(self, items: list[Parsed], runs: list[Run]) -> int:
        """Every noted run parsed whole into its place (nothing left out): returns 0."""
        return self._parse(items, runs, None, set(), None)

    def _parse(
        self,
        items: list[Parsed],
        runs: list[Run],
        noted: list[_Columns] | None,
        gone: set[int],
        horizon: int | None,
    ) -> int:
        """The runs' tuples into their places in ``items``, but those of the ends at an address
        in ``gone`` older than ``horizon`` (a run with a later one keeps them all)."""
        out: list[Parsed] = []
        last = dropped = 0
        flip = _FLIP
        for number, (index, span, position, count, size) in enumerate(runs):
            out.extend(items[last:index])
            last = index
            wide = self._wide[size]
            assert wide is not None  # split noted the run: its Struct is known
            stop = position + count * size
            leave = 0
            if gone and noted is not None:
                end, _, addresses = noted[number]
                leave = int.from_bytes(bytes(map(gone.__contains__, addresses)), "little")
                leave &= int.from_bytes(end, "little")
            if leave and horizon is not None:
                words = memoryview(span)[: len(span) // 8 * 8].cast("Q")
                times = words[position // 8 + _TIMES : stop // 8 : size // 8]
                if max(compress(times, leave.to_bytes(count, "little"))) >= horizon:
                    # the ends at or past it wait (held: their tuples are made)
                    leave &= int.from_bytes(bytes(map(horizon.__gt__, times)), "little")
            if not leave:
                out.extend(wide[0].iter_unpack(memoryview(span)[position:stop]))
                continue
            keep = leave.to_bytes(count, "little").translate(flip)
            kept = compress(range(position, stop, size), keep)
            out.extend(map(wide[0].unpack_from, repeat(span), kept))
            dropped += count - keep.count(1)
        out.extend(items[last:])
        items[:] = out
        return dropped

    def _columns(self, span: bytes, position: int, count: int, size: int) -> _Columns:
        """A run's ends (a byte a record: 1 for an end, CLOSE from other than SYN_SENT), its
        starts (1 for SYN_SENT or LISTEN) and its socket addresses.

        By the states' low bytes only (the kernel's states are below 256): a state with other
        bits set would be read as a start it is not (a socket kept, never one left out), or as
        the end it is not, which the per-record path hands to ``Tracker.set_state``: a state
        other than SYN_SENT, ESTABLISHED or LISTEN there forgets the socket, as an end does."""
        stop = position + count * size
        new = span[position + self._new + _LOW : stop : size]
        old = span[position + self._old + _LOW : stop : size]
        end = int.from_bytes(new.translate(self._close), "little")
        end &= int.from_bytes(old.translate(self._not_syn_sent), "little")
        shift = self._skaddr % 8
        words = memoryview(span)[shift : shift + (len(span) - shift) // 8 * 8].cast("Q")
        first = (position + self._skaddr - shift) // 8
        addresses = words[first : first + count * size // 8 : size // 8].tolist()
        return end.to_bytes(count, "little"), new.translate(self._start), addresses
