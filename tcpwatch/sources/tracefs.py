"""tracefs: where it is mounted, and what an event's ``format`` file says about its records.

Every tracepoint has a directory ``<tracefs>/events/<system>/<event>/`` whose ``id`` file is the
``config`` perf_event_open(2) takes (``PERF_TYPE_TRACEPOINT``) and whose ``format`` file gives
each field's offset, size and signedness in the raw record (Documentation/trace/events.rst;
the lines are tab-indented)::

    name: inet_sock_set_state
    ID: 2287
    format:
        field:unsigned short common_type;   offset:0;   size:2; signed:0;
        ...
        field:const void * skaddr;  offset:8;   size:8; signed:0;
        field:__u8 saddr[4];    offset:32;  size:4; signed:0;

    print fmt: "... oldstate=%s ...", ..., __print_symbolic(REC->oldstate,
        { 1, "TCP_ESTABLISHED" }, { 2, "TCP_SYN_SENT" }, ...)

Offsets differ between kernels, so they are read here at start and never hard-coded. The
``print fmt`` line's ``__print_symbolic`` tables name the values of enum fields (drop and reset
reasons, TCP states): those numbers change between kernels too, so they are read as well.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from tcpwatch.validation import shown_path

# Where tracefs is found: its own mount point (4.1+), then the old place under debugfs.
TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
MOUNT_HINT = "mount -t tracefs nodev /sys/kernel/tracing"
_MAX_FORMAT_BYTES = 64 << 10  # kfree_skb's format, the longest read, is about 4 KiB on 6.18

_FIELD = re.compile(
    r"^\s*field:(?P<declaration>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)
_SYMBOLIC = re.compile(r"__print_symbolic\(REC->(?P<field>\w+),(?P<table>(?:\s*\{[^}]*\},?)*)\)")
_SYMBOL = re.compile(r"\{\s*(?P<value>-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*\"(?P<name>[^\"]*)\"\s*\}")
_ARRAY = re.compile(r"\[(\d*)\]$")


class TracefsError(Exception):
    """tracefs is not mounted or unreadable, or an event or field is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Field:
    """One field of an event's raw record."""

    name: str
    offset: int
    size: int
    signed: bool
    array: bool  # declared as ``type name[N]`` (addresses: saddr[4], saddr_v6[16], saddr[28])


@dataclass(frozen=True, slots=True)
class EventFormat:
    """An event's id (perf's config) and record layout, and the names of its enum values."""

    system: str
    name: str
    id: int
    fields: Mapping[str, Field]
    # field -> value -> name, from __print_symbolic in ``print fmt`` (only numeric tables)
    symbols: Mapping[str, Mapping[int, str]]

    @property
    def title(self) -> str:
        return f"{self.system}:{self.name}"

    def field(self, name: str) -> Field:
        """The field ``name``; TracefsError naming the event when this kernel lacks it."""
        found = self.fields.get(name)
        if found is None:
            raise TracefsError(f"tracepoint {self.title} has no field {name!r} on this kernel")
        return found

    def record_size(self) -> int:
        """Bytes up to the end of the last field (a raw record may be longer: padding)."""
        return max(field.offset + field.size for field in self.fields.values())

    def value_of(self, field: str, symbol: str) -> int:
        """The number the kernel gives ``symbol`` (a reason or state name) in ``field``."""
        for value, name in self.symbols.get(field, {}).items():
            if name == symbol:
                return value
        raise TracefsError(f"tracepoint {self.title}: {field} has no value named {symbol!r}")

    def unpacker(self, names: tuple[str, ...], base: int = 0) -> struct.Struct:
        """A Struct reading ``names`` (in that order) from byte ``base`` of the raw record (its
        start by default).

        Integers are read in native byte order with the declared size and sign; arrays as bytes.
        Gaps become pad bytes, so one ``unpack_from`` reads every wanted field.
        """
        chosen = sorted((self.field(name) for name in names), key=lambda field: field.offset)
        if [field.name for field in chosen] != list(names):
            raise TracefsError(f"{self.title}: fields must be asked for in record order")
        parts = ["="]
        position = base
        for field in chosen:
            if field.offset < position:
                raise TracefsError(f"{self.title}: field {field.name} overlaps the one before it")
            parts.append(f"{field.offset - position}x" if field.offset > position else "")
            parts.append(_code(field))
            position = field.offset + field.size
        return struct.Struct("".join(parts))


def _code(field: Field) -> str:
    if field.array:
        return f"{field.size}s"
    codes = {1: "b", 2: "h", 4: "i", 8: "q"}
    code = codes.get(field.size)
    if code is None:
        return f"{field.size}s"
    return code if field.signed else code.upper()


def parse_format(text: str, system: str = "", name: str = "") -> EventFormat:
    """An EventFormat from the text of a ``format`` file; TracefsError when it is not one."""
    event_id: int | None = None
    fields: dict[str, Field] = {}
    symbols: dict[str, dict[int, str]] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("name:") and not name:
            name = stripped.partition(":")[2].strip()
        elif stripped.startswith("ID:"):
            value = stripped.partition(":")[2].strip()
            if not value.isdigit():
                raise TracefsError(f"format of {system}:{name}: bad ID line {stripped[:80]!r}")
            event_id = int(value)
        elif stripped.startswith("field:"):
            match = _FIELD.match(stripped)
            if match is None:
                raise TracefsError(f"format of {system}:{name}: bad field line {stripped[:80]!r}")
            declaration = match["declaration"].strip()
            array = _ARRAY.search(declaration)
            base = declaration[: array.start()] if array else declaration
            field_name = re.split(r"[\s*]+", base.strip())[-1]
            fields[field_name] = Field(
                field_name,
                int(match["offset"]),
                int(match["size"]),
                match["signed"] == "1",
                array is not None,
            )
        elif stripped.startswith("print fmt:"):
            for table in _SYMBOLIC.finditer(stripped):
                values = symbols.setdefault(table["field"], {})
                for symbol in _SYMBOL.finditer(table["table"]):
                    values.setdefault(int(symbol["value"], 0), symbol["name"])
    if event_id is None or not fields:
        raise TracefsError(f"format of {system}:{name} has no ID or no fields")
    return EventFormat(system, name, event_id, fields, symbols)


def find_tracefs(candidates: tuple[str, ...] = TRACEFS_MOUNTS) -> str:
    """The first candidate that holds tracefs' ``events`` directory.

    TracefsError with the fix when none does: not mounted, or not readable by us (tracefs is
    root's, mode 0700, unless CAP_DAC_READ_SEARCH lets us through).
    """
    denied = None
    for path in candidates:
        events = os.path.join(path, "events")
        try:
            os.stat(os.path.join(events, "header_page"))
        except PermissionError:
            denied = path
        except OSError:
            continue
        else:
            return path
    if denied is not None:
        raise TracefsError(
            f"tracefs at {shown_path(denied)} is not readable (it is root's: run as root or "
            "with CAP_DAC_READ_SEARCH)"
        )
    raise TracefsError(f"tracefs is not mounted at {' or '.join(candidates)} ({MOUNT_HINT})")


def read_event_format(tracefs: str, system: str, name: str) -> EventFormat:
    """The format of ``system:name``; TracefsError when this kernel lacks the event."""
    path = os.path.join(tracefs, "events", system, name, "format")
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_FORMAT_BYTES)
    except FileNotFoundError:
        raise TracefsError(f"this kernel has no tracepoint {system}:{name}") from None
    except OSError as error:
        raise TracefsError(f"cannot read {shown_path(path)}: {error.strerror}") from None
    return parse_format(raw.decode("ascii", "replace"), system, name)
