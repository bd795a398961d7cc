"""From ring-buffer records to the tracker: which events this kernel has, their filters, and the
dispatch of each record (a sample to its event's decoder, a side-band record to the tasks).

Nothing here touches the kernel: the reader (tracepoints.py) collects the records, this module
turns them into calls on the Tracker, so the hot path can be tested and measured on fixtures.
"""

from __future__ import annotations

import bisect
import operator
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tcpwatch.sources import perf
from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.lifecycle_events import ADDRESS_BYTES
from tcpwatch.sources.tracefs import EventFormat, TracefsError, read_event_format
from tcpwatch.sources.tracepoints_batch import GENERIC, TIME_ITEM, Parsed, SpanParser
from tcpwatch.sources.tracepoints_tally import BOUNDS_NS
from tcpwatch.sources.tracepoints_tracker import (
    CLIENT,
    CONNECTED,
    KEY,
    LABEL_LIMIT,
    NETNS,
    RETRANSMITS,
    ROLE,
    STARTED,
    Tracker,
)
from tcpwatch.tracepoint_stats import TracepointHost

Spec = tuple[str, str]
Handler = Callable[[events.Buffer, int, int, int, int, bool], None]
# A sample's pid, tid, time, then (past the raw size) the raw record's common_type and flags.
_SAMPLE = struct.Struct("=8xIIQ4xHB")
_LOST = struct.Struct("=8xQQ")  # header, id, lost
_COMM = struct.Struct("=8xII")  # header, pid, tid, then the name (NUL-padded)
_TASK = struct.Struct("=8xIIII")  # FORK and EXIT: pid, ppid, tid, ptid
_NAMESPACES = struct.Struct("=8xIIQQQ")  # pid, tid, nr, link_info[0] (NET_NS_INDEX): dev, ino
TRAILER = 16  # sample_id_all: pid, tid, time at the end of every non-sample record


@dataclass(frozen=True, slots=True)
class EventSet:
    """The events this kernel has, with their kernel-side filters and enum names."""

    formats: Mapping[Spec, EventFormat]
    filters: Mapping[Spec, str]
    states: events.TcpStates
    drop_reasons: Mapping[int, str]
    reset_reasons: Mapping[int, str]
    missing: tuple[str, ...]  # one note per optional event left out, naming why


def load_events(tracefs: str) -> EventSet:
    """Read every event's format; TracefsError when a required one is missing."""
    formats: dict[Spec, EventFormat] = {}
    missing: list[str] = []
    for spec in events.REQUIRED:
        formats[spec] = read_event_format(tracefs, *spec)
    for spec in events.OPTIONAL:
        try:
            formats[spec] = read_event_format(tracefs, *spec)
        except TracefsError as error:
            missing.append(f"{events.EVENT_NAMES[spec]}: {error}")
    return event_set(formats, missing)


def event_set(formats: Mapping[Spec, EventFormat], missing: list[str] | None = None) -> EventSet:
    """Filters and enum names for ``formats`` (an optional event that cannot be filtered on
    this kernel is left out, with a note)."""
    chosen = dict(formats)
    notes = list(missing or ())
    states = events.tcp_states(chosen[events.SET_STATE])
    filters: dict[Spec, str] = {
        events.SET_STATE: events.set_state_filter(states),
        events.ERROR_REPORT: events.error_report_filter(chosen[events.ERROR_REPORT]),
    }
    drop_reasons: dict[int, str] = {}
    if events.KFREE_SKB in chosen:
        try:
            filters[events.KFREE_SKB], drop_reasons = events.drop_filter(chosen[events.KFREE_SKB])
        except TracefsError as error:
            del chosen[events.KFREE_SKB]
            notes.append(f"drop: {error}")
    if events.RETRANSMIT in chosen:
        filters[events.RETRANSMIT] = events.retransmit_filter(states)
    reset_reasons: dict[int, str] = {}
    if events.SEND_RESET in chosen:
        reset_reasons = dict(chosen[events.SEND_RESET].symbols.get("reason", {}))
    return EventSet(chosen, filters, states, drop_reasons, reset_reasons, tuple(notes))


_by_time = operator.itemgetter(0)
_by_parsed_time = operator.itemgetter(TIME_ITEM)


class RecordReader:
    """Hands records to the tracker in time order; counts them per event, and the lost ones."""

    def __init__(self, chosen: EventSet, tracker: Tracker) -> None:
        self.tracker = tracker
        formats = chosen.formats
        self._dispatch = _handlers(formats, tracker)
        self._names = {formats[spec].id: events.EVENT_NAMES[spec] for spec in formats}
        self._counts: dict[int, int] = dict.fromkeys(self._names, 0)
        self.lost = 0
        self.events = tuple(sorted(fmt.title for fmt in formats.values()))
        self._spans = SpanParser(formats[events.SET_STATE])
        self._held: list[Parsed] = []  # records at or after the last horizon (handle_spans)
        # a connect's destination bytes (SpanParser.destination) -> Tracker.label's name
        self._labels: dict[bytes, str] = {}

    def handle(self, records: list[perf.Record], ordered: bool = False) -> None:
        """Every record, oldest first (``ordered``: they already are, one ring's).

        The hot path: a sample is one unpack (pid, tid, time, event, flags) and one call of its
        event's handler; side-band records are rare and go through :meth:`record`.
        """
        if not ordered:
            records.sort(key=_by_time)
        dispatch = self._dispatch
        counts = self._counts
        head = _SAMPLE.unpack_from
        interrupt = events.INTERRUPT_FLAGS
        raw_offset = perf.RAW_OFFSET
        sample = perf.PERF_RECORD_SAMPLE
        other = self.record
        for _, offset, kind, size, buffer in records:
            if kind != sample:
                other(buffer, offset, kind, size)
                continue
            pid, tid, time_ns, common_type, flags = head(buffer, offset)
            handler = dispatch.get(common_type)
            if handler is not None:
                counts[common_type] += 1
                handler(
                    buffer,
                    offset + raw_offset,
                    pid,
                    tid,
                    time_ns,
                    tid != 0 and not flags & interrupt,
                )

    def handle_spans(self, spans: list[bytes], horizon: int | None = None) -> None:
        """Every record of each ring's span (perf.RingBuffer.take), oldest first: the same
        calls on the tracker as :meth:`handle` on those records, with set_state samples
        parsed a run at a time (tracepoints_batch.py) and handled here inline.

        ``horizon`` (CLOCK_MONOTONIC ns, taken before the first ring was taken): records at or
        after it are held for the next call. The rings are taken one after another, so a record
        written to an already-taken ring after its take (a socket's end, say) can be older than
        one taken from the next ring (a new socket at the same address entering SYN_SENT on
        another CPU); handled now, the newer record would come first and the older end would
        forget the new connect. Every record older than the horizon was in its ring when the
        takes began, so what is handled is in time order across the rings."""
        parser = self._spans
        items, self._held = self._held, []
        parsed = 0
        for span in spans:
            if span:
                parsed += parser.split(span, items)
        if not items:
            return
        items.sort(key=_by_parsed_time)  # the rings' runs and the held records: nearly sorted
        if horizon is not None:
            cut = bisect.bisect_left(items, horizon, key=_by_parsed_time)
            if cut < len(items):
                self._held = items[cut:]
                del items[cut:]
        self._counts[parser.event] += parsed
        tracker = self.tracker
        set_state, connecting, established = (
            tracker.set_state,
            tracker.connecting,
            tracker.established,
        )
        sockets, tallies, labels = tracker.sockets, tracker.tallies.get, self._labels
        followed, forget = sockets.get, sockets.pop
        netns_of, name_of = (table.get for table in tracker.tasks.known())
        bounds, bucket_of = BOUNDS_NS, bisect.bisect_left
        # A record follows one socket at most: with this much room, none can find it full.
        roomy = len(sockets) + len(items) < tracker.socket_limit
        states = tracker.states
        close, syn_sent, connected = states.close, states.syn_sent, states.established
        interrupt = events.INTERRUPT_FLAGS
        inet, pad = events.AF_INET, events.PAD12
        source, destination, source6, destination6 = parser.addresses or (slice(0),) * 4
        named, ports = parser.destination, parser.ports
        one = self.handle
        for pid, tid, at, flags, sk, old, new, rest in items:
            # The common records of a connection take no 4-tuple they do not use, and the
            # tracker's work for them is inline here (its methods where it is not the common
            # case): a socket's end (Tracker.ended), a connect's end, a connect's start. A
            # GENERIC record (no state) goes past the first two to the per-record path.
            if new == close and old != syn_sent:
                gone = forget(sk, None)
                if gone is not None and gone[ROLE] == CLIENT:
                    tracker.end_unseen()  # its connect's end never arrived (Tracker.ended)
                continue
            if old == syn_sent and new == connected:
                entry = followed(sk)  # Tracker.established, a followed client's connects row
                if entry is not None and entry[ROLE] == CLIENT:
                    tally = tallies(entry[NETNS])
                    row = tally.connects.get(entry[KEY]) if tally is not None else None
                    if row is not None:
                        entry[ROLE] = CONNECTED
                        elapsed = at - entry[STARTED]
                        row.buckets[bucket_of(bounds, elapsed)] += 1
                        row.count += 1
                        row.sum_ns += elapsed
                        if entry[RETRANSMITS]:
                            row.syn_retransmits += entry[RETRANSMITS]
                            row.retransmitted += 1
                        continue
                established(sk, at)
                continue
            if pid == GENERIC:  # (GENERIC, type, time, offset, size, -, -, span)
                one([(at, flags, tid, sk, rest)], ordered=True)
                continue
            task = tid != 0 and not flags & interrupt
            if new == syn_sent:
                # Tracker.connecting, a known task to a known destination, room to follow it
                label = labels.get(rest[named])
                inode, process = netns_of(tid), name_of(pid)
                if (
                    task
                    and label is not None
                    and inode is not None
                    and process is not None
                    and (roomy or len(sockets) < tracker.socket_limit)
                ):
                    sockets[sk] = [inode, CLIENT, (label, process), at, 0]
                    continue
                sport, dport, family = ports(rest)
                to = rest[destination] + pad if family == inet else rest[destination6]
                connecting(pid, tid, at, task, sk, family, dport, to)
                if label is None and family in ADDRESS_BYTES:
                    if len(labels) >= LABEL_LIMIT:
                        labels.clear()
                    labels[rest[named]] = tracker.label(family, to, dport)
                continue
            sport, dport, family = ports(rest)
            if family == inet:
                set_state(pid, tid, at, task, sk, old, new, family, sport, dport,
                          rest[source] + pad, rest[destination] + pad)  # fmt: skip
            else:
                set_state(pid, tid, at, task, sk, old, new, family, sport, dport,
                          rest[source6], rest[destination6])  # fmt: skip

    def record(self, buffer: events.Buffer, offset: int, kind: int, size: int) -> None:
        """One record: a sample to its event's handler, or a side-band record."""
        if kind == perf.PERF_RECORD_SAMPLE:
            self.handle([(0, offset, kind, size, buffer)], ordered=True)
            return
        tasks = self.tracker.tasks
        if kind == perf.PERF_RECORD_NAMESPACES and size >= _NAMESPACES.size + TRAILER:
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
            name = bytes(buffer[offset + _COMM.size : offset + size - TRAILER])
            tasks.named(pid, tid, name.split(b"\0", 1)[0].decode("utf-8", "replace"))
        elif kind == perf.PERF_RECORD_LOST:
            self.lost += _LOST.unpack_from(buffer, offset)[1]

    def host(self, cpus: int, buffer_bytes: int, lost: int | None = None) -> TracepointHost:
        """The reader's counts; ``lost`` from the events themselves where the kernel counts it,
        else the PERF_RECORD_LOST records read so far."""
        tracker = self.tracker
        return TracepointHost(
            records={self._names[key]: count for key, count in sorted(self._counts.items())},
            lost=self.lost if lost is None else lost,
            unattributed=dict(sorted(tracker.unattributed.items())),
            other_netns=tracker.other_netns,
            cpus=cpus,
            buffer_bytes=buffer_bytes,
            events=self.events,
            sockets_followed=len(tracker.sockets),
        )


def _handlers(formats: Mapping[Spec, EventFormat], tracker: Tracker) -> dict[int, Handler]:
    """One closure per event: decode its raw record, call the tracker (the hot path)."""
    handlers: dict[int, Handler] = {}
    state_format = formats[events.SET_STATE]
    states = state_format.unpacker(("skaddr", "oldstate", "newstate")).unpack_from
    decode_state = events.set_state_decoder(state_format)
    set_state, ended, established = tracker.set_state, tracker.ended, tracker.established
    close, syn_sent = tracker.states.close, tracker.states.syn_sent
    connected, connecting = tracker.states.established, tracker.connecting

    def on_set_state(buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool) -> None:
        sk, old, new = states(buf, raw)
        if new == close and old != syn_sent:  # most records: a socket's end, no 4-tuple needed
            ended(sk)
            return
        if old == syn_sent and new == connected:  # a connect's end: no 4-tuple needed either
            established(sk, t)
            return
        decoded = decode_state(buf, raw)
        if new == syn_sent:  # a connect's start: its destination only, as handle_spans calls it
            connecting(pid, tid, t, task, sk, decoded[3], decoded[5], decoded[7])
            return
        set_state(pid, tid, t, task, *decoded)

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

        def on_sent(buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool) -> None:
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

        def on_drop(buf: events.Buffer, raw: int, pid: int, tid: int, t: int, task: bool) -> None:
            drop(pid, tid, task, *decode_drop(buf, raw))

        handlers[formats[events.KFREE_SKB].id] = on_drop
    return handlers
