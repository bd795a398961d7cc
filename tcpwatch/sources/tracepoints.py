"""The ``tracepoints`` source: the kernel's TCP tracepoints, read with perf_event_open(2) and a
ring buffer per CPU, with no eBPF program, compiler or kernel headers.

One reader per host (tracepoints are global, not per namespace): it opens the events of
tracepoints_events.py on every online CPU with their kernel-side filters, reads the records
where they lie in the ring buffers, and hands them to the Tracker (tracepoints_tracker.py), which
gives each its namespace and process or counts it as unattributed. Each poll drains the counts
of every polled namespace. A side-band event on each CPU brings the task exits, renames and
namespace changes the task resolver needs (tracepoints_tasks.py). Users' view: docs/tracepoints.md.

Needs CAP_PERFMON (or CAP_SYS_ADMIN) and a readable tracefs; without them ``start`` raises one
line saying which, the source is down (``tcpwatch_source_up{source="tracepoints"} 0``) and every
other source works as before.
"""

from __future__ import annotations

import mmap
import select
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from tcpwatch.config import CollectSettings
from tcpwatch.model import Snapshot, TracepointHost, TracepointStats
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import perf
from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.base import Partial, SourceContext, host_long_lived_source
from tcpwatch.sources.lifecycle_events import Context, make_context
from tcpwatch.sources.tracefs import EventFormat, TracefsError, find_tracefs, read_event_format
from tcpwatch.sources.tracepoints_tasks import TaskResolver
from tcpwatch.sources.tracepoints_tracker import Tracker

DEFAULT_BUFFER_BYTES = 512 << 10  # per CPU: within perf_event_mlock_kb's 516 KiB, no CAP_IPC_LOCK
RECORD_BYTES = 120  # ring-buffer bytes one record takes (header, pid/tid, time, raw ~80-96)
DESIGN_RATE = 100_000  # records/s the read delay is sized for (20k connections/s, ~5 each)
_COMMON = struct.Struct("=HB")  # common_type, common_flags
_LOST = struct.Struct("=8xQQ")  # header, id, lost
_COMM = struct.Struct("=8xII")  # header, pid, tid, then the name (NUL-padded)
_TASK = struct.Struct("=8xIIII")  # FORK and EXIT: pid, ppid, tid, ptid
_NAMESPACES = struct.Struct("=8xIIQQQ")  # pid, tid, nr, link_info[0] (NET_NS_INDEX): dev, ino
_TRAILER = 16  # sample_id_all: pid, tid, time at the end of every non-sample record
Handler = Callable[[events.Buffer, int, int, int, int, bool], None]


def _by_time(record: perf.Record) -> int:
    return record[0]


def _sideband_attr() -> bytes:
    """A dummy software event that samples nothing: its ring gets perf's side-band records
    (fork, exit, exec and rename, namespaces) of every task on its CPU."""
    return perf.encode_attr(
        perf.PERF_TYPE_SOFTWARE,
        perf.PERF_COUNT_SW_DUMMY,
        sample_type=perf.PERF_SAMPLE_TID | perf.PERF_SAMPLE_TIME,
        task_events=True,
    )


class TracepointReader:
    """Every CPU's ring buffer, one epoll descriptor over them, and the tracker they feed.

    Each read takes what every ring holds and hands the records over in time order (a task may
    fork on one CPU and connect on another). ``read_ready`` (the gathering thread) and ``drain``
    (the poll thread) share the tracker under one lock, held for one read: at most one full
    buffer per CPU, about 10 ms of work.
    """

    def __init__(
        self,
        settings: CollectSettings,
        paths: ProcPaths | None = None,
        tracefs: str | None = None,
        cpus: Sequence[int] | None = None,
    ) -> None:
        root = tracefs if tracefs is not None else find_tracefs()
        formats: dict[tuple[str, str], EventFormat] = {}
        self.missing: list[str] = []
        for spec in events.REQUIRED:
            formats[spec] = read_event_format(root, *spec)
        for spec in events.OPTIONAL:
            try:
                formats[spec] = read_event_format(root, *spec)
            except TracefsError as error:
                self.missing.append(f"{events.EVENT_NAMES[spec]}: {error}")
        states = events.tcp_states(formats[events.SET_STATE])
        filters: dict[tuple[str, str], str] = {
            events.SET_STATE: events.set_state_filter(states),
            events.ERROR_REPORT: events.error_report_filter(formats[events.ERROR_REPORT]),
        }
        drop_reasons: dict[int, str] = {}
        if events.KFREE_SKB in formats:
            try:
                filters[events.KFREE_SKB], drop_reasons = events.drop_filter(
                    formats[events.KFREE_SKB]
                )
            except TracefsError as error:
                del formats[events.KFREE_SKB]
                self.missing.append(f"drop: {error}")
        if events.RETRANSMIT in formats:
            filters[events.RETRANSMIT] = events.retransmit_filter(states)
        reset_reasons: dict[int, str] = {}
        if events.SEND_RESET in formats:
            reset_reasons = dict(formats[events.SEND_RESET].symbols.get("reason", {}))
        self._lock = threading.Lock()
        self.tracker = Tracker(
            TaskResolver(paths),
            states,
            settings.connection_peers,
            drop_reasons,
            reset_reasons,
        )
        self._dispatch = self._handlers(formats)
        self._names = {formats[spec].id: events.EVENT_NAMES[spec] for spec in formats}
        self._counts: dict[int, int] = dict.fromkeys(self._names, 0)
        self.lost = 0
        self.events = tuple(sorted(fmt.title for fmt in formats.values()))
        pages = max(1, settings.tracepoint_buffer // mmap.PAGESIZE)
        pages = 1 << (pages.bit_length() - 1)  # a power of two, at most what was asked
        self.buffer_bytes = pages * mmap.PAGESIZE
        self.cpus = tuple(cpus) if cpus is not None else perf.online_cpus()
        self._perf = perf.PerfEvents()
        self._rings: list[perf.RingBuffer] = []
        self._epoll = select.epoll()
        try:
            self._open(formats, filters, pages)
        except BaseException:
            self.close()
            raise

    def _open(
        self,
        formats: Mapping[tuple[str, str], EventFormat],
        filters: Mapping[tuple[str, str], str],
        pages: int,
    ) -> None:
        sideband = _sideband_attr()
        for cpu in self.cpus:
            owner: int | None = None
            for spec, fmt in formats.items():
                fd = self._perf.open(
                    perf.encode_attr(perf.PERF_TYPE_TRACEPOINT, fmt.id), cpu, fmt.title
                )
                if spec in filters:
                    self._perf.set_filter(fd, filters[spec], fmt.title)
                if owner is None:
                    owner = fd
                    ring = perf.RingBuffer(fd, pages)
                    self._rings.append(ring)
                    self._epoll.register(fd, select.EPOLLIN)
                else:
                    self._perf.set_output(fd, owner)
            assert owner is not None
            self._perf.set_output(self._perf.open(sideband, cpu, "task side-band"), owner)
        self._perf.enable()

    def _handlers(self, formats: Mapping[tuple[str, str], EventFormat]) -> dict[int, Handler]:
        tracker = self.tracker
        handlers: dict[int, Handler] = {}
        decode_state = events.set_state_decoder(formats[events.SET_STATE])
        set_state = tracker.set_state

        def on_set_state(
            buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool
        ) -> None:
            set_state(pid, tid, t, task, *decode_state(buf, raw))

        handlers[formats[events.SET_STATE].id] = on_set_state
        decode_error = events.error_report_decoder(formats[events.ERROR_REPORT])
        error_report = tracker.error_report

        def on_error(buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool) -> None:
            error_report(*decode_error(buf, raw))

        handlers[formats[events.ERROR_REPORT].id] = on_error
        if events.RETRANSMIT in formats:
            decode_retransmit = events.retransmit_decoder(formats[events.RETRANSMIT])
            retransmit = tracker.retransmit

            def on_retransmit(
                buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool
            ) -> None:
                retransmit(decode_retransmit(buf, raw)[0])

            handlers[formats[events.RETRANSMIT].id] = on_retransmit
        if events.SEND_RESET in formats:
            decode_sent, _ = events.send_reset_decoder(formats[events.SEND_RESET])
            send_reset = tracker.send_reset

            def on_sent(
                buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool
            ) -> None:
                send_reset(pid, tid, t, task, *decode_sent(buf, raw))

            handlers[formats[events.SEND_RESET].id] = on_sent
        if events.RECEIVE_RESET in formats:
            decode_received = events.receive_reset_decoder(formats[events.RECEIVE_RESET])
            receive_reset = tracker.receive_reset

            def on_received(
                buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool
            ) -> None:
                receive_reset(pid, tid, task, *decode_received(buf, raw))

            handlers[formats[events.RECEIVE_RESET].id] = on_received
        if events.KFREE_SKB in formats:
            decode_drop = events.drop_decoder(formats[events.KFREE_SKB])
            drop = tracker.drop

            def on_drop(
                buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool
            ) -> None:
                drop(pid, tid, task, *decode_drop(buf, raw))

            handlers[formats[events.KFREE_SKB].id] = on_drop
        return handlers

    # -- reading ---------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._epoll.fileno()

    @property
    def read_delay(self) -> float:
        """Seconds the gathering thread may leave the rings unread after a read: the time a
        quarter of one CPU's buffer takes to fill at DESIGN_RATE records/s spread over the
        CPUs, at most 20 ms (about 27 ms for 512 KiB on 2 CPUs: 20 ms)."""
        records = self.buffer_bytes / RECORD_BYTES
        rate = DESIGN_RATE / max(1, len(self.cpus))
        return min(0.02, records / 4 / rate)

    def read_ready(self) -> None:
        """Read what every ring holds (the gathering thread, when one is readable)."""
        with self._lock:
            self._read()

    def _read(self) -> None:
        """Every record the rings hold, in time order, then their space back. Lock held."""
        records: list[perf.Record] = []
        ends = [ring.collect(records) for ring in self._rings]
        try:
            if len(ends) > 1:
                records.sort(key=_by_time)
            handle = self._record
            for _, offset, kind, size, buffer in records:
                handle(buffer, offset, kind, size)
        finally:
            for ring, end in zip(self._rings, ends, strict=True):
                ring.release(end)
        self.tracker.expire(time.monotonic_ns())

    def _record(self, buffer: events.Buffer, offset: int, kind: int, size: int) -> None:
        """One record: a sample to its event's handler, or a side-band record."""
        if kind == perf.PERF_RECORD_SAMPLE:
            pid, tid, time_ns, _ = perf.SAMPLE_HEAD.unpack_from(buffer, offset)
            raw = offset + perf.RAW_OFFSET
            common_type, flags = _COMMON.unpack_from(buffer, raw)
            handler = self._dispatch.get(common_type)
            if handler is not None:
                self._counts[common_type] += 1
                in_task = tid != 0 and not flags & events.INTERRUPT_FLAGS
                handler(buffer, raw, pid, tid, time_ns, in_task)
            return
        tasks = self.tracker.tasks
        if kind == perf.PERF_RECORD_NAMESPACES and size >= _NAMESPACES.size + _TRAILER:
            _, tid, count, _, inode = _NAMESPACES.unpack_from(buffer, offset)
            if count:
                tasks.entered(tid, inode)
        elif kind == perf.PERF_RECORD_FORK:
            tasks.forked(*_TASK.unpack_from(buffer, offset))
        elif kind == perf.PERF_RECORD_EXIT:
            pid, _, tid, _ = _TASK.unpack_from(buffer, offset)
            tasks.exited(pid, tid)
        elif kind == perf.PERF_RECORD_COMM:
            pid, tid = _COMM.unpack_from(buffer, offset)
            name = bytes(buffer[offset + _COMM.size : offset + size - _TRAILER])
            tasks.named(pid, tid, name.split(b"\0", 1)[0].decode("utf-8", "replace"))
        elif kind == perf.PERF_RECORD_LOST:
            self.lost += _LOST.unpack_from(buffer, offset)[1]

    # -- polls -----------------------------------------------------------------------------------

    def drain(self, so_far: Sequence[Snapshot]) -> Mapping[int, TracepointStats] | Partial:
        """Every polled namespace's share, after reading what the rings hold now."""
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
            self._read()
            tracker = self.tracker
            tracker.update_contexts(contexts, [s.identity.inode for s in so_far])
            host = TracepointHost(
                records={self._names[key]: count for key, count in sorted(self._counts.items())},
                lost=self.lost,
                unattributed=dict(sorted(tracker.unattributed.items())),
                other_netns=tracker.other_netns,
                cpus=len(self.cpus),
                buffer_bytes=self.buffer_bytes,
                events=self.events,
                sockets_followed=len(tracker.sockets),
            )
            shares = tracker.stats((s.identity.inode for s in so_far), host)
        if self.missing:
            return Partial(shares, tuple(self.missing))
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
