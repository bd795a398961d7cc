"""perf_event_open(2) for tracepoints, and the ring buffers it fills, in plain ctypes and mmap.

Python has no wrapper for perf_event_open, so it is called through libc's ``syscall()`` with the
architecture's number (x86_64 298, aarch64 241; other architectures are refused with a reason).
One event is opened per tracepoint per CPU (``pid = -1``: every task on that CPU); the events of
one CPU share one ring buffer (``PERF_EVENT_IOC_SET_OUTPUT``), mapped once: 1 metadata page and
2^n data pages. The kernel writes records at ``data_head``; we read up to it and move
``data_tail``, which frees the space. A record that does not fit is not written: the kernel
counts it and, once there is room, writes a ``PERF_RECORD_LOST`` record with the exact number.

Ordering: ``data_head`` must be read before the records it covers, and the records read before
``data_tail`` is written. x86's memory model keeps loads in order and stores after loads; on
aarch64 a call that releases and takes the GIL (a pthread mutex: a release, then an acquire)
stands where the kernel's documentation puts ``smp_rmb()`` and ``smp_mb()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Callable

# include/uapi/linux/perf_event.h
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_DUMMY = 9
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_FORMAT_LOST = 1 << 4
PERF_RECORD_LOST = 2
PERF_RECORD_COMM = 3
PERF_RECORD_EXIT = 4
PERF_RECORD_FORK = 7
PERF_RECORD_SAMPLE = 9
PERF_RECORD_NAMESPACES = 16
_ATTR_DISABLED = 1 << 0
_ATTR_COMM = 1 << 9
_ATTR_TASK = 1 << 13
_ATTR_WATERMARK = 1 << 14
_ATTR_SAMPLE_ID_ALL = 1 << 18
_ATTR_USE_CLOCKID = 1 << 25
_ATTR_NAMESPACES = 1 << 28
_CLOCK_MONOTONIC = 1
_ATTR_SIZE = 128  # PERF_ATTR_SIZE_VER7; the kernel takes any size it knows, zeros beyond it
# type, size, config, sample_period, sample_type, read_format, flags, wakeup, bp_type,
# config1, config2, branch_sample_type, sample_regs_user, sample_stack_user, clockid
_ATTR = struct.Struct("=IIQQQQQIIQQQQIi")
# _IO('$', n) and _IOW('$', n, char *) on the 64-bit architectures we run on
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
PERF_EVENT_IOC_SET_FILTER = 0x40082406
SYSCALL_NUMBERS = {"x86_64": 298, "aarch64": 241}
# struct perf_event_mmap_page: data_head, data_tail, data_offset, data_size at 1024 (4.1+)
_MMAP_PAGE_DATA = struct.Struct("=QQQQ")
_DATA_HEAD_OFFSET = 1024
_DATA_TAIL = struct.Struct("=Q")
_DATA_TAIL_OFFSET = 1032
RECORD_HEADER = struct.Struct("=IHH")  # perf_event_header: type, misc, size

# A sample with TID | TIME | RAW: header, pid, tid, time, raw size, then the raw record.
SAMPLE_TYPE = PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_RAW
SAMPLE_HEAD = struct.Struct("=8xIIQI")
RAW_OFFSET = SAMPLE_HEAD.size  # 28: where the raw record starts in a sample


class PerfError(Exception):
    """perf_event_open or one of its ioctls failed; the message says why and what it needs."""


class LockedMemoryError(PerfError):
    """A ring buffer could not be mapped: more locked memory than the process may have."""


def syscall_number(machine: str | None = None) -> int:
    """perf_event_open's number on this architecture; PerfError on one we do not know."""
    name = machine if machine is not None else platform.machine()
    number = SYSCALL_NUMBERS.get(name)
    if number is None:
        known = ", ".join(sorted(SYSCALL_NUMBERS))
        raise PerfError(f"perf_event_open is not wired for architecture {name!r} (only {known})")
    return number


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.restype = ctypes.c_int
    return libc


def permission_hint(code: int = errno.EACCES) -> str:
    """What opening failed for want of: the capabilities, and the host's paranoia setting;
    EPERM may also be a seccomp filter's answer (systemd's SystemCallFilter=, a container
    runtime's profile), which the kernel cannot be told apart from."""
    try:
        with open("/proc/sys/kernel/perf_event_paranoid", "rb") as file:
            paranoid = file.read(16).decode("ascii", "replace").strip()
    except OSError:
        paranoid = "unknown"
    hint = (
        "needs CAP_PERFMON (or CAP_SYS_ADMIN) to read tracepoints on every CPU "
        f"(kernel.perf_event_paranoid is {paranoid})"
    )
    if code == errno.EPERM:
        hint += ", and a seccomp filter that allows perf_event_open"
    return hint


def encode_attr(
    event_type: int,
    config: int,
    *,
    sample_type: int = SAMPLE_TYPE,
    task_events: bool = False,
    wakeup_bytes: int = 0,
    count_lost: bool = False,
) -> bytes:
    """A perf_event_attr: one sample per event (period 1), created disabled, stamped with
    CLOCK_MONOTONIC (one clock for every CPU, so a connect begun on one CPU and finished on
    another is timed right, and records of all CPUs can be put in order), the sample's pid, tid
    and time also appended to every other record (``sample_id_all``). ``task_events`` adds
    perf's side-band records of every task: fork, exit, exec and renames (PERF_RECORD_FORK,
    EXIT, COMM) and namespaces at fork, setns and unshare (PERF_RECORD_NAMESPACES).
    ``wakeup_bytes`` > 0 wakes a poller only once that much is queued. ``count_lost``
    (Linux 6.0+, PERF_FORMAT_LOST) makes ``read()`` of the descriptor return, beside the count,
    the samples of this event that found its ring full: see :func:`read_lost`.
    """
    flags = _ATTR_DISABLED | _ATTR_USE_CLOCKID | _ATTR_SAMPLE_ID_ALL
    if task_events:
        flags |= _ATTR_TASK | _ATTR_COMM | _ATTR_NAMESPACES
    wakeup = 1
    if wakeup_bytes > 0:
        flags |= _ATTR_WATERMARK
        wakeup = wakeup_bytes
    read_format = PERF_FORMAT_LOST if count_lost else 0
    attr = _ATTR.pack(
        event_type, _ATTR_SIZE, config, 1, sample_type, read_format, flags, wakeup, 0, 0, 0, 0,
        0, 0, _CLOCK_MONOTONIC,
    )  # fmt: skip
    return attr.ljust(_ATTR_SIZE, b"\0")


class PerfEvents:
    """The descriptors of one set of perf events; closes them all on ``close()``."""

    def __init__(self, machine: str | None = None) -> None:
        self._number = syscall_number(machine)
        self._libc = _libc()
        self.fds: list[int] = []

    def open(self, attr: bytes, cpu: int, what: str) -> int:
        """Open one event on ``cpu`` for every task; PerfError naming ``what`` and the fix."""
        buffer = ctypes.create_string_buffer(attr, len(attr))
        fd = int(self._libc.syscall(self._number, buffer, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC))
        if fd < 0:
            code = ctypes.get_errno()
            if code in (errno.EACCES, errno.EPERM):
                reason = f"{os.strerror(code)}: {permission_hint(code)}"
                raise PerfError(f"perf_event_open({what}): {reason}")
            if code == errno.ENOSYS:
                raise PerfError("perf_event_open is missing (a kernel without CONFIG_PERF_EVENTS)")
            raise PerfError(f"perf_event_open({what}) on CPU {cpu}: {os.strerror(code)}")
        self.fds.append(fd)
        return fd

    def ioctl(self, fd: int, request: int, argument: object, what: str) -> None:
        if self._libc.ioctl(fd, request, argument) < 0:
            code = ctypes.get_errno()
            raise PerfError(f"{what}: {os.strerror(code)}")

    def set_filter(self, fd: int, expression: str, what: str) -> None:
        """A kernel-side filter (tracefs filter syntax, Documentation/trace/events.rst)."""
        text = ctypes.create_string_buffer(expression.encode("ascii"))
        self.ioctl(fd, PERF_EVENT_IOC_SET_FILTER, text, f"filter {expression!r} on {what}")

    def set_output(self, fd: int, target: int) -> None:
        """Write ``fd``'s records into ``target``'s ring buffer (same CPU)."""
        self.ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, ctypes.c_int(target), "sharing a ring buffer")

    def enable(self) -> None:
        for fd in self.fds:
            self.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0, "enabling an event")

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


_COUNT_AND_LOST = struct.Struct("=QQ")  # read() with PERF_FORMAT_LOST alone: value, lost


def read_counts(fd: int) -> tuple[int, int]:
    """(count, lost) of an event opened with ``count_lost``: the samples that passed its filter
    so far (the kernel adds each before it tries to write it: kernel/events/core.c,
    perf_swevent_event) and those of them that found its ring full."""
    raw = os.read(fd, _COUNT_AND_LOST.size)
    if len(raw) < _COUNT_AND_LOST.size:
        raise PerfError(f"reading a perf event gave {len(raw)} bytes, not {_COUNT_AND_LOST.size}")
    count, lost = _COUNT_AND_LOST.unpack(raw)
    return int(count), int(lost)


def read_lost(fd: int) -> int:
    """Samples of an event opened with ``count_lost`` that found its ring full, so far: exact
    and current (PERF_RECORD_LOST tells the same only once the ring takes a record again)."""
    return read_counts(fd)[1]


def _barrier_call() -> Callable[[], object] | None:
    """On weakly ordered CPUs, a libc call through ctypes, which releases and retakes the GIL
    (a pthread mutex release, then an acquire): the barrier between ring-buffer loads and the
    kernel's stores. None on x86_64, whose loads are not reordered with each other."""
    if platform.machine() == "x86_64":
        return None
    call: Callable[[], object] = _libc().getppid
    return call


# (time, offset, type, size, buffer) of one record: see RingBuffer.collect.
Record = tuple[int, int, int, int, mmap.mmap | bytes]
_TIME = struct.Struct("=Q")
_SAMPLE_TIME = 16  # header, pid, tid, then the time
_SAMPLE_START = struct.Struct("=IHH8xQ")  # a sample's header and time (other records: garbage)


class RingBuffer:
    """One CPU's mapped ring buffer: read every record written so far, in order, in place."""

    def __init__(self, fd: int, data_pages: int) -> None:
        if data_pages < 1 or data_pages & (data_pages - 1):
            raise ValueError(f"data pages must be a power of two, got {data_pages}")
        page = mmap.PAGESIZE
        try:
            self._map = mmap.mmap(
                fd, (1 + data_pages) * page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as error:
            kind = LockedMemoryError if error.errno in (errno.EPERM, errno.ENOMEM) else PerfError
            raise kind(
                f"mapping a {data_pages * page // 1024} KiB ring buffer: {error.strerror} "
                "(without CAP_IPC_LOCK, kernel.perf_event_mlock_kb per CPU and RLIMIT_MEMLOCK "
                "bound it)"
            ) from None
        _, _, offset, size = _MMAP_PAGE_DATA.unpack_from(self._map, _DATA_HEAD_OFFSET)
        # Kernels before 4.1 leave data_offset/size 0: the data area follows the first page.
        self.data_offset = offset or page
        self.data_size = size or data_pages * page
        self.fd = fd
        self._barrier = _barrier_call()

    def pending(self) -> int:
        """Bytes written and not yet read."""
        head, tail = _MMAP_PAGE_DATA.unpack_from(self._map, _DATA_HEAD_OFFSET)[:2]
        return int(head - tail)

    def collect(self, out: list[Record]) -> int:
        """Append every complete record written so far to ``out``, in ring order, as
        (time, offset, type, size, buffer); returns the position to :meth:`release` once they
        are handled (until then the kernel does not write over them).

        ``buffer`` is the mapping itself, or a copy of a record that wraps around the end of the
        data area: nothing else is copied. The time is the sample's, or the one perf appends to
        other records (every event is opened with ``sample_id_all``).
        """
        memory = self._map
        head, tail = _MMAP_PAGE_DATA.unpack_from(memory, _DATA_HEAD_OFFSET)[:2]
        if head == tail:
            return int(head)
        barrier = self._barrier
        if barrier is not None:
            barrier()
        base, size = self.data_offset, self.data_size
        mask = size - 1
        unpack_header = RECORD_HEADER.unpack_from
        unpack_sample = _SAMPLE_START.unpack_from
        unpack_time = _TIME.unpack_from
        append = out.append
        sample = PERF_RECORD_SAMPLE
        position = tail
        while position < head:
            start = position & mask
            if start + _SAMPLE_START.size <= size:  # most records: header and time in one read
                kind, _, length, at = unpack_sample(memory, base + start)
                if length < 8 or position + length > head:
                    raise PerfError(f"corrupt ring buffer: a record of {length} bytes")
                if start + length <= size:
                    if kind != sample:
                        at = unpack_time(memory, base + start + length - 8)[0]
                    append((at, base + start, kind, length, memory))
                    position += length
                    continue
            else:  # the header may wrap
                kind, _, length = unpack_header(self._copy(start, 8), 0)
                if length < 8 or position + length > head:
                    raise PerfError(f"corrupt ring buffer: a record of {length} bytes")
            copy = self._copy(start, length)  # the record wraps around the end
            at = unpack_time(copy, _SAMPLE_TIME if kind == sample else length - 8)[0]
            append((at, 0, kind, length, copy))
            position += length
        return int(position)

    def take(self) -> bytes:
        """Every complete record written so far, copied out in ring order as one ``bytes`` (a
        span that wraps around the end of the data area is joined: one copy), and their space
        given back to the kernel at once. The batch parser (tracepoints_batch.py) reads it;
        :meth:`collect` is the per-record path, in place."""
        memory = self._map
        head, tail = _MMAP_PAGE_DATA.unpack_from(memory, _DATA_HEAD_OFFSET)[:2]
        if head == tail:
            return b""
        barrier = self._barrier
        if barrier is not None:
            barrier()
        base, size = self.data_offset, self.data_size
        length = head - tail
        if length > size or length < 0:
            raise PerfError(f"corrupt ring buffer: {length} bytes pending in a {size}-byte ring")
        start = tail & (size - 1)
        first = min(length, size - start)
        data = memory[base + start : base + start + first]
        if first < length:
            data += memory[base : base + length - first]
        self.release(int(head))
        return data

    def release(self, position: int) -> None:
        """Give the space up to ``position`` (from :meth:`collect`) back to the kernel."""
        barrier = self._barrier
        if barrier is not None:
            barrier()
        _DATA_TAIL.pack_into(self._map, _DATA_TAIL_OFFSET, position)

    def _copy(self, start: int, length: int) -> bytes:
        base, size = self.data_offset, self.data_size
        first = min(length, size - start)
        memory = self._map
        return memory[base + start : base + start + first] + memory[base : base + length - first]

    def close(self) -> None:
        self._map.close()


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> tuple[int, ...]:
    """The CPUs the kernel runs on ("0-1,4"): one ring buffer each."""
    try:
        with open(path, encoding="ascii") as file:
            text = file.read(4096).strip()
    except OSError:
        return tuple(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise PerfError(f"cannot read the online CPUs from {path}: {text[:80]!r}")
        cpus.extend(range(int(low), int(high or low) + 1))
    return tuple(cpus)
