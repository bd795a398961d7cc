"""Build perf ring-buffer records by hand, from the real tracefs formats of the fixture tree.

A sample is laid out as the reader opens its events: header, pid, tid, time, raw size, then
the raw record (``common_*`` fields, then the event's fields at the offsets its ``format`` file
gives). Side-band records carry the ``sample_id_all`` trailer (pid, tid, time). Each record is
its own ``bytes`` (offset 0), as the ring buffer hands over a record that wrapped.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from pathlib import Path

from tcpwatch.sources import perf
from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.tracefs import EventFormat
from tcpwatch.sources.tracepoints_records import EventSet, load_events

TRACEFS = str(Path(__file__).resolve().parents[1] / "fixtures" / "tracefs")
SOFTIRQ = events.TRACE_FLAG_SOFTIRQ


def fixture_events() -> EventSet:
    return load_events(TRACEFS)


def v4(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, address)


def v6(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address)


def sockaddr(address: str, port: int) -> bytes:
    """A sockaddr_in / sockaddr_in6 padded to 28 bytes, as tcp_send_reset records them."""
    if ":" in address:
        raw = struct.pack("=H", socket.AF_INET6) + port.to_bytes(2, "big") + bytes(4)
        raw += v6(address) + bytes(4)
    else:
        raw = struct.pack("=H", socket.AF_INET) + port.to_bytes(2, "big") + v4(address)
    return raw.ljust(28, b"\0")


def raw_record(fmt: EventFormat, pid: int, flags: int, fields: Mapping[str, int | bytes]) -> bytes:
    raw = bytearray(fmt.record_size())
    struct.pack_into("=HBBi", raw, 0, fmt.id, flags, 0, pid)
    for name, value in fields.items():
        field = fmt.field(name)
        if isinstance(value, bytes):
            raw[field.offset : field.offset + len(value)] = value[: field.size]
            continue
        code = {1: "b", 2: "h", 4: "i", 8: "q"}[field.size]
        struct.pack_into("=" + (code if field.signed else code.upper()), raw, field.offset, value)
    return bytes(raw)


def sample(
    fmt: EventFormat,
    time_ns: int,
    pid: int,
    tid: int | None = None,
    flags: int = 0,
    **fields: int | bytes,
) -> perf.Record:
    tid = pid if tid is None else tid
    raw = raw_record(fmt, tid, flags, fields)
    body = struct.pack("=IIQI", pid, tid, time_ns, len(raw)) + raw
    size = (8 + len(body) + 7) & ~7
    record = struct.pack("=IHH", perf.PERF_RECORD_SAMPLE, 0, size) + body
    return (time_ns, 0, perf.PERF_RECORD_SAMPLE, size, record.ljust(size, b"\0"))


def _sideband(kind: int, body: bytes, time_ns: int, pid: int, tid: int) -> perf.Record:
    trailer = struct.pack("=IIQ", pid, tid, time_ns)
    size = 8 + len(body) + len(trailer)
    return (time_ns, 0, kind, size, struct.pack("=IHH", kind, 0, size) + body + trailer)


def fork(
    time_ns: int, pid: int, ppid: int, tid: int | None = None, ptid: int | None = None
) -> perf.Record:
    tid = pid if tid is None else tid
    ptid = ppid if ptid is None else ptid
    body = struct.pack("=IIIIQ", pid, ppid, tid, ptid, time_ns)
    return _sideband(perf.PERF_RECORD_FORK, body, time_ns, pid, tid)


def exit_(time_ns: int, pid: int, tid: int | None = None) -> perf.Record:
    tid = pid if tid is None else tid
    body = struct.pack("=IIIIQ", pid, 1, tid, 1, time_ns)
    return _sideband(perf.PERF_RECORD_EXIT, body, time_ns, pid, tid)


def comm(time_ns: int, pid: int, name: str, tid: int | None = None) -> perf.Record:
    tid = pid if tid is None else tid
    encoded = name.encode() + b"\0"
    body = struct.pack("=II", pid, tid) + encoded.ljust((len(encoded) + 7) & ~7, b"\0")
    return _sideband(perf.PERF_RECORD_COMM, body, time_ns, pid, tid)


def namespaces(time_ns: int, pid: int, inode: int, tid: int | None = None) -> perf.Record:
    tid = pid if tid is None else tid
    links = struct.pack("=QQ", 4, inode) + bytes(16 * 6)  # net first, then 6 others
    body = struct.pack("=IIQ", pid, tid, 7) + links
    return _sideband(perf.PERF_RECORD_NAMESPACES, body, time_ns, pid, tid)


def lost(time_ns: int, count: int) -> perf.Record:
    body = struct.pack("=QQ", 1, count)
    return _sideband(perf.PERF_RECORD_LOST, body, time_ns, 0, 0)
