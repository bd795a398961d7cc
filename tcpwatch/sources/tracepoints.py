"""The ``tracepoints`` source: the kernel's TCP tracepoints, read with perf_event_open(2) and a
ring buffer per CPU, with no eBPF program, compiler or kernel headers.

One reader per host (tracepoints are global, not per namespace): it opens the events of
tracepoints_events.py on every online CPU with their kernel-side filters, and a side-band event
per CPU for task forks, exits, names and namespaces; reads the records where they lie in the ring
buffers; and hands them, in time order, to the Tracker (tracepoints_records.py,
tracepoints_tracker.py), which gives each its namespace and process or counts it unattributed.
Each poll drains the counts of every polled namespace. Users' view: docs/tracepoints.md.

Needs CAP_PERFMON (or CAP_SYS_ADMIN) and a readable tracefs; without them ``start`` raises one
line saying which, the source is down (``tcpwatch_source_up{source="tracepoints"} 0``) and every
other source works as before.
"""

from __future__ import annotations

import mmap
import os
import select
import threading
import time
from collections.abc import Mapping, Sequence

from tcpwatch.config import CollectSettings
from tcpwatch.model import Snapshot
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import perf
from tcpwatch.sources.base import Partial, SourceContext, host_long_lived_source
from tcpwatch.sources.lifecycle_events import Context, make_context
from tcpwatch.sources.tracefs import find_tracefs
from tcpwatch.sources.tracepoints_delivery import Undelivered, per_event
from tcpwatch.sources.tracepoints_events import EVENT_NAMES
from tcpwatch.sources.tracepoints_records import EventSet, RecordReader, load_events
from tcpwatch.sources.tracepoints_tasks import TaskResolver, own_addresses
from tcpwatch.sources.tracepoints_tracker import Tracker
from tcpwatch.tracepoint_stats import TracepointStats

RECORD_BYTES = 120  # ring-buffer bytes one record takes (header, pid/tid, time, raw ~80-96)
DESIGN_RATE = 100_000  # records/s the read delay is sized for (20k connections/s, ~5 each)
# A read handles only the records older than this before its takes began (the rest wait for
# the next read): a record is in its ring microseconds after its time (written with preemption
# off), and this leaves room for interrupts and a virtual CPU's pauses. A drain waits this long
# before it reads, so it handles every record made before it was called.
HOLD_NS = 10_000_000
# The kernel wakes the reader once a ring holds a quarter of its size, not at every record: a
# wake-up per record (an interrupt and a scheduler wake-up each) cost the traced work itself
# more than the records (benchmarks/bench_tracepoints.py). Each poll's drain reads what is
# below the mark, so at low rates records wait for the poll, never past it.
WAKEUP_FRACTION = 4


def _sideband_attr() -> bytes:
    """A dummy software event that samples nothing: its ring gets perf's side-band records
    (fork, exit, exec and rename, namespaces) of every task on its CPU."""
    return perf.encode_attr(
        perf.PERF_TYPE_SOFTWARE,
        perf.PERF_COUNT_SW_DUMMY,
        sample_type=perf.PERF_SAMPLE_TID | perf.PERF_SAMPLE_TIME,
        task_events=True,
    )


AUTO_TOTAL_BYTES = 8 << 20  # collect.tracepoint_buffer 0: this much over every CPU ...
AUTO_MIN_BYTES = 512 << 10  # ... but at least this per CPU (kernel.perf_event_mlock_kb's 516 KiB)


def ring_pages(buffer_bytes: int, cpus: int = 1) -> int:
    """Data pages per ring: a power of two, at most ``buffer_bytes`` (at least one).

    0 chooses: AUTO_TOTAL_BYTES spread over the CPUs, at least AUTO_MIN_BYTES each. What a
    record waits in the ring is time the reader may be off the CPU without losing any (on a
    loaded 2-CPU machine 512 KiB lost records at 30,000 records/s, 4 MiB none:
    docs/performance.md); 8 MiB in all stays within the default RLIMIT_MEMLOCK plus the
    per-CPU allowance of kernel.perf_event_mlock_kb.
    """
    if buffer_bytes <= 0:
        buffer_bytes = max(AUTO_MIN_BYTES, AUTO_TOTAL_BYTES // max(1, cpus))
    pages = max(1, buffer_bytes // mmap.PAGESIZE)
    return 1 << (pages.bit_length() - 1)


class TracepointReader:
    """Every CPU's ring buffer, one epoll descriptor over them, and the tracker they feed.

    Each read takes what every ring holds and hands the records over in time order (a task may
    fork on one CPU and connect on another). ``read_ready`` (the gathering thread) and ``drain``
    (the poll thread) share the tracker under one lock, held for one read: the gathering thread
    reads a ring once it is a quarter full (about 9,000 records of a 4 MiB ring, some 20 ms of
    work), so a drain finds little left; a full ring is about 35,000 records.
    """

    def __init__(
        self,
        settings: CollectSettings,
        paths: ProcPaths | None = None,
        tracefs: str | None = None,
        cpus: Sequence[int] | None = None,
    ) -> None:
        chosen = load_events(tracefs if tracefs is not None else find_tracefs())
        self.missing = chosen.missing
        tracker = Tracker(
            TaskResolver(paths),
            chosen.states,
            drop_reasons=chosen.drop_reasons,
            reset_reasons=chosen.reset_reasons,
        )
        self.records = RecordReader(chosen, tracker)
        self._paths = paths or ProcPaths()
        try:
            self._own_inode = os.stat(self._paths.pid("self", "ns", "net")).st_ino
        except OSError:
            self._own_inode = 0
        self._lock = threading.Lock()
        self.cpus = tuple(cpus) if cpus is not None else perf.online_cpus()
        chosen_size = settings.tracepoint_buffer
        pages = ring_pages(chosen_size, len(self.cpus))
        while True:
            self.buffer_bytes = pages * mmap.PAGESIZE
            self._perf = perf.PerfEvents()
            self._rings: list[perf.RingBuffer] = []
            self._epoll = select.epoll()
            self._counted: bool | None = None  # PERF_FORMAT_LOST: None until an event says
            self._counting: list[int] = []
            self._counting_events: list[str] = []  # the event of each of _counting
            self._undelivered = Undelivered()
            try:
                self._open(chosen, pages)
                return
            except perf.LockedMemoryError:
                self.close()
                # A size tcpwatch chose gives way to what the process may lock, down to the
                # per-CPU allowance every user has; a size the user set is an error to show.
                if chosen_size > 0 or pages * mmap.PAGESIZE <= AUTO_MIN_BYTES:
                    raise
                pages //= 2
            except BaseException:
                self.close()
                raise

    def _open(self, chosen: EventSet, pages: int) -> None:
        """Per CPU: every event, its filter, one ring the others write into; then enable.

        Each event counts its own lost samples where the kernel can (6.0+); before that the
        PERF_RECORD_LOST records say it, once a ring takes a record again.
        """
        sideband = _sideband_attr()
        wakeup = self.buffer_bytes // WAKEUP_FRACTION
        for cpu in self.cpus:
            owner: int | None = None
            for spec, fmt in chosen.formats.items():
                fd = self._open_counted(fmt.id, cpu, fmt.title, wakeup, EVENT_NAMES[spec])
                if spec in chosen.filters:
                    self._perf.set_filter(fd, chosen.filters[spec], fmt.title)
                if owner is None:
                    owner = fd
                    self._rings.append(perf.RingBuffer(fd, pages))
                    self._epoll.register(fd, select.EPOLLIN)
                else:
                    self._perf.set_output(fd, owner)
            assert owner is not None
            self._perf.set_output(self._perf.open(sideband, cpu, "task side-band"), owner)
        self._perf.enable()

    def _open_counted(self, config: int, cpu: int, what: str, wakeup: int, event: str) -> int:
        if self._counted is not False:
            attr = perf.encode_attr(
                perf.PERF_TYPE_TRACEPOINT, config, wakeup_bytes=wakeup, count_lost=True
            )
            try:
                fd = self._perf.open(attr, cpu, what)
            except perf.PerfError:
                if self._counted:
                    raise  # it worked for another event: this failure is not the format's
                self._counted = False  # a kernel before 6.0: PERF_FORMAT_LOST is unknown
            else:
                self._counted = True
                self._counting.append(fd)
                self._counting_events.append(event)
                return fd
        attr = perf.encode_attr(perf.PERF_TYPE_TRACEPOINT, config, wakeup_bytes=wakeup)
        return self._perf.open(attr, cpu, what)

    def lost(self) -> int:
        """Records lost so far: the events' own counts, else the PERF_RECORD_LOST records."""
        if self._counted:
            return sum(perf.read_lost(fd) for fd in self._counting)
        return self.records.lost

    def _counts(self) -> list[tuple[int, int]]:
        """(count, lost) of every counted event descriptor, in _counting's order."""
        return [perf.read_counts(fd) for fd in self._counting]

    # -- reading ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def read_delay(self) -> float:
        """Seconds the gathering thread may leave the rings unread after a read (it is woken
        when a ring is a quarter full): the time another quarter takes to fill at DESIGN_RATE
        records/s spread over the CPUs, at most 20 ms (512 KiB on 2 CPUs: 27 ms; 4 MiB: 218 ms)."""
        records = self.buffer_bytes / RECORD_BYTES
        rate = DESIGN_RATE / max(1, len(self.cpus))
        return min(0.02, records / 4 / rate)

    def read_ready(self) -> None:
        """Read what every ring holds (the gathering thread, when one is readable)."""
        with self._lock:
            self._read(time.monotonic_ns() - HOLD_NS)

    def _read(self, horizon: int) -> None:
        """Every record the rings hold (copied out, their space given back at once), in time
        order; those at or after ``horizon`` (CLOCK_MONOTONIC ns, at least HOLD_NS before the
        takes begin) wait for the next read, when every ring has been taken again after them.
        Lock held."""
        self.records.handle_spans([ring.take() for ring in self._rings], horizon)
        self.records.tracker.expire(horizon)

    # -- polls -----------------------------------------------------------------------------------

    def drain(self, so_far: Sequence[Snapshot]) -> Mapping[int, TracepointStats] | Partial:
        """Every polled namespace's share since the previous drain, after reading what the
        rings hold now (the pipeline's budget makes rows of it)."""
        # The events' counts, then the horizon: a record counted before the count was read has
        # its time before the horizon (tracepoints_delivery.py), so it is handled by this drain,
        # lost, or never delivered.
        with self._lock:
            counted = self._counts() if self._counted else None
        horizon = time.monotonic_ns()  # every record made before the drain: its time is before
        time.sleep(HOLD_NS / 1e9)  # this, and it is in its ring HOLD_NS later
        addresses = own_addresses(self._paths)  # read outside the lock: a procfs read
        contexts: dict[int, Context] = {}
        for snapshot in so_far:
            sockets, sysctls = snapshot.sockets, snapshot.sysctls
            if sockets is None:
                continue  # the dump failed: the namespace keeps its previous context
            contexts[snapshot.identity.inode] = make_context(
                (listener.port for listener in sockets.listeners),
                sysctls.port_range if sysctls is not None else None,
                [(listener.address, listener.port) for listener in sockets.listeners],
            )
        with self._lock:
            self._read(horizon)
            tracker = self.records.tracker
            tracker.update_contexts(contexts, [s.identity.inode for s in so_far])
            tracker.own = (self._own_inode, addresses)
            if counted is not None:
                names = self._counting_events
                after = self._counts()
                undelivered = self._undelivered.update(
                    per_event(zip(names, (count for count, _ in counted), strict=True)),
                    per_event(zip(names, (lost for _, lost in after), strict=True)),
                    self.records.handled(),
                )
                lost = sum(lost for _, lost in after)
                host = self.records.host(len(self.cpus), self.buffer_bytes, lost, undelivered)
            else:
                host = self.records.host(len(self.cpus), self.buffer_bytes, self.lost())
            shares = tracker.stats((s.identity.inode for s in so_far), host)
        if self.missing:
            return Partial(shares, self.missing)
        return shares

    def close(self) -> None:
        with self._lock:
            self._perf.close()
            for ring in self._rings:
                ring.close()
            self._rings.clear()
            self._epoll.close()


def _enabled(settings: CollectSettings) -> bool:
    return settings.tracepoints


@host_long_lived_source("tracepoints", field="tracepoints", order=70, enabled=_enabled)
def start_tracepoints(context: SourceContext) -> TracepointReader:
    """Open the events on every CPU (raises PerfError or TracefsError with the reason)."""
    return TracepointReader(context.settings, context.paths)
