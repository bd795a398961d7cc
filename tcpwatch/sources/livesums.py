"""A peer's live connections summed while a scan runs (the per-destination scan, sockdiag.py;
the listeners' connections, inbound.py): the scan appends each connection's raw sock_diag
message to its peer's :class:`PeerRows`, which sums every field over all of them at once with
strided memoryviews (liveinfo.Layout.columns: C loops, no tuple per message), every
:data:`FOLD_BYTES` and at the end, and unpacks into rows only the few connections it keeps as
evidence. Measured on 6.18 it costs less than the four-field unpack per message it replaced
(docs/performance.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from tcpwatch.sources.liveinfo import (
    RCVBUF,
    RMEM,
    ROW,
    TIMER_PERSIST,
    Columns,
    Layout,
    RowReader,
    connection,
    seconds,
)
from tcpwatch.stalls import Stalls

FOLD_MESSAGES = 512  # a peer's raw messages kept before they are summed (memory stays bounded)
WORST = 5  # connections kept per peer as evidence

# Fields summed over a peer's connections, and the criteria its evidence is chosen by (in the
# order the evidence lists them after the leaders: a closed window now is "timer").
_SUMMED = (
    "retrans",
    "rtt",
    "total_retrans",
    "segs_out",
    "busy_time",
    "rwnd_limited",
    "sndbuf_limited",
    "rqueue",
    "wqueue",
    "drops",
    "total_rto_recoveries",
    "total_rto_time",
)
_CRITERIA = (
    "rwnd_limited",
    "timer",
    "rqueue",
    "sndbuf_limited",
    "drops",
    "wqueue",
    "total_retrans",
)
# Retransmissions the peer reported as duplicates (D-SACK): summed per connection as
# min(tcpi_dsack_dups, tcpi_total_retrans), since the kernel counts every duplicate the peer
# reports, also those no retransmission of ours caused (the network duplicated a segment).
_READ = (*dict.fromkeys((*_SUMMED, "timer", "dsack_dups")),)


class PeerRows:
    """One peer's live connections while a scan runs: raw messages of one layout in
    :attr:`pieces` (the caller appends each as bytes, and calls :meth:`fold` once there are
    :data:`FOLD_MESSAGES`), summed into running totals; :meth:`finish` makes the Stalls."""

    __slots__ = (
        "best",
        "count",
        "layout",
        "leaders",
        "leading",
        "maxima",
        "pieces",
        "receive_full",
        "rtt_timed",
        "rwnd_connections",
        "size",
        "sndbuf_connections",
        "spurious",
        "sums",
        "zero_window",
    )

    def __init__(self, layout: Layout, leaders: int = 1) -> None:
        self.layout = layout
        self.leaders = leaders  # connections kept for the longest waits on the peer's window
        self.size = layout.size  # read by the scans' hot loops
        self.pieces: list[bytes] = []
        self.count = 0
        self.sums = dict.fromkeys(_SUMMED, 0)
        self.maxima = {"rtt": 0, "rqueue": 0, "wqueue": 0}
        self.rtt_timed = 0
        self.zero_window = 0
        self.receive_full = 0
        self.rwnd_connections = 0
        self.sndbuf_connections = 0
        self.spurious = 0  # retransmissions the peer reported received twice (see _READ)
        # criterion -> (its value, the message); leading: (rwnd_limited, order, message)
        self.best: dict[str, tuple[int, bytes]] = {}
        self.leading: list[tuple[int, int, bytes]] = []

    def switch(self, layout: Layout, reader: RowReader) -> None:
        """Messages of another layout follow: sum what is buffered first."""
        self.fold(reader)
        self.layout = layout
        self.size = layout.size

    def fold(self, reader: RowReader) -> None:
        """Add every message kept so far to the totals, and forget them."""
        if not self.pieces:
            return
        joined, size = b"".join(self.pieces), self.layout.size
        self.pieces = []
        count = len(joined) // size

        def records(index: int) -> bytes:
            return joined[index * size : (index + 1) * size]

        if self.layout.uniform(joined):
            columns = self.layout.columns(joined, _READ)
            if columns is not None:
                self._add(columns, count, records, joined)
                return
        # Not all of one arrangement (or unaligned): one message at a time.
        rows, kept = [], []
        for index in range(count):
            row = reader.read(joined, index * size, size)
            if row is not None:
                rows.append(row)
                kept.append(records(index))
        if rows:
            transposed = zip(*rows, strict=True)
            by_row: Columns = {
                name: list(values) for name, values in zip(ROW, transposed, strict=False)
            }
            self._add(by_row, len(rows), kept.__getitem__, None)

    def _add(
        self,
        columns: Columns,
        count: int,
        record: Callable[[int], bytes],
        joined: bytes | None,
    ) -> None:
        """Add ``count`` messages, given as columns (None: 0 in every message)."""
        self.count += count
        sums = self.sums
        for name in _SUMMED:
            values = columns.get(name)
            if values:
                sums[name] += sum(values)
        dsack, retransmitted = columns.get("dsack_dups"), columns.get("total_retrans")
        if dsack and retransmitted:
            self.spurious += sum(map(min, dsack, retransmitted))
        rtt = columns.get("rtt")
        if rtt:
            self.rtt_timed += count - rtt.count(0)
        maxima = self.maxima
        for name in maxima:
            values = columns.get(name)
            if values:
                maxima[name] = max(maxima[name], max(values))
        timers = columns.get("timer")
        if timers:
            self.zero_window += timers.count(TIMER_PERSIST)
        rwnd = columns.get("rwnd_limited")
        if rwnd:
            self.rwnd_connections += count - rwnd.count(0)
        sndbuf = columns.get("sndbuf_limited")
        if sndbuf:
            self.sndbuf_connections += count - sndbuf.count(0)
        rqueue = columns.get("rqueue")
        if rqueue and self.layout.skmem:
            self.receive_full += self._receive_full(rqueue, count, record, joined)
        for name in _CRITERIA:
            values = columns.get(name)
            if not values:
                continue
            if name == "timer":
                if TIMER_PERSIST in values and "timer" not in self.best:
                    self.best["timer"] = (1, record(values.index(TIMER_PERSIST)))
                continue
            top = max(values)
            if top > 0 and top > self.best.get(name, (0, b""))[0]:
                self.best[name] = (top, record(values.index(top)))
        leaders = self.leaders
        if leaders > 1 and rwnd:
            order = self.count
            ranked = heapq.nlargest(leaders, range(count), key=rwnd.__getitem__)
            self.leading += [(rwnd[i], order - i, record(i)) for i in ranked if rwnd[i] > 0]
            self.leading = heapq.nlargest(leaders, self.leading)

    def _receive_full(
        self,
        rqueue: Sequence[int],
        count: int,
        record: Callable[[int], bytes],
        joined: bytes | None,
    ) -> int:
        """Messages with data queued and half or more of their receive buffer in use."""
        extra = None if joined is None else self.layout.columns(joined, ("rmem_alloc", "rcvbuf"))
        if extra is None:
            rows = [self.layout.row(record(i)) for i in range(count)]
            memory: Sequence[int] = [row[RMEM] for row in rows]
            buffers: Sequence[int] = [row[RCVBUF] for row in rows]
        else:
            memory = extra.get("rmem_alloc") or [0] * count
            buffers = extra.get("rcvbuf") or [0] * count
        return sum(
            1
            for queued, used, size in zip(rqueue, memory, buffers, strict=True)
            if queued and 2 * used >= size
        )

    def worst(self) -> list[bytes]:
        """The messages kept as evidence, in order: the leaders, then one per criterion."""
        chosen = [message for _, _, message in self.leading]
        for name in _CRITERIA:
            found = self.best.get(name)
            if found is not None and found[1] not in chosen:
                chosen.append(found[1])
        return chosen[:WORST]

    def finish(self, reader: RowReader, ends: Callable[[bytes], tuple[str, str]]) -> Stalls:
        """The peer's Stalls, with its worst connections named by ``ends`` (local, remote)."""
        self.fold(reader)
        known = reader.known
        sums = self.sums
        worst = []
        for message in self.worst():
            row = self.layout.row(message) if self.layout.matches(message, 0) else None
            if row is None:
                row = reader.read(message, 0, len(message))
            if row is not None:
                local, remote = ends(message)
                worst.append(connection(row, reader, local, remote, source_port=False))
        return Stalls(
            connections=self.count,
            busy_seconds=seconds(sums["busy_time"]) if known("busy_time") else None,
            rwnd_limited_seconds=(seconds(sums["rwnd_limited"]) if known("rwnd_limited") else None),
            sndbuf_limited_seconds=(
                seconds(sums["sndbuf_limited"]) if known("sndbuf_limited") else None
            ),
            send_queue_bytes=sums["wqueue"],
            send_queue_max_bytes=self.maxima["wqueue"],
            receive_queue_bytes=sums["rqueue"],
            receive_queue_max_bytes=self.maxima["rqueue"],
            zero_window=self.zero_window,
            receive_full=self.receive_full,
            drops=sums["drops"] if reader.skmem else None,
            retransmits_in_flight=sums["retrans"],
            rto_recoveries=(
                sums["total_rto_recoveries"] if known("total_rto_recoveries") else None
            ),
            rto_seconds=(  # milliseconds in the kernel
                sums["total_rto_time"] / 1000 if known("total_rto_time") else None
            ),
            rwnd_limited_connections=self.rwnd_connections,
            sndbuf_limited_connections=self.sndbuf_connections,
            segments_sent=sums["segs_out"],
            segments_retransmitted=sums["total_retrans"],
            segments_spurious=self.spurious if known("dsack_dups") else None,
            worst=tuple(worst),
        )
