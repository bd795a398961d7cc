"""The socket-table source: the sock_diag dumps of one namespace (which dumps, in which order;
sockdiag.py parses them), read after sysctl and sockstat, with ESTABLISHED kept exact under churn
and the per-destination data on its own cadence.

The aggregator is looked up on the sockdiag module at each call, so a benchmark can swap it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from tcpwatch.model import FAMILIES, Snapshot, SocketTable
from tcpwatch.sources import netlink, procnet, sockdiag
from tcpwatch.sources.base import SourceContext, netns_source
from tcpwatch.sources.netlink import INFO_EXTENSION, SKMEMINFO_EXTENSION, SockDiagError
from tcpwatch.sources.sockdiag import (
    ALL_STATES_MASK,
    ESTABLISHED_MASK,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Receiver,
)

LISTEN_MASK = 1 << TCP_LISTEN
# States a socket leaves by a timer that may send nothing (a request socket's last SYN-ACK
# timeout, a SYN_SENT's last retry, an orphan's give-up): a table holding any is not reused.
_TIMED_STATES = ("syn_sent", "syn_recv", "fin_wait1", "closing", "last_ack", "close")


def run_dump(
    send: Callable[[bytes], object],
    receive: Receiver,
    request: bytes,
    family: str | None,
    aggregator: sockdiag.DumpAggregator | netlink.StateCounter,
    buffer: memoryview,
) -> None:
    send(request)
    while True:
        length = receive(buffer)
        if length <= 0:
            raise SockDiagError("netlink socket closed before the dump ended")
        if aggregator.feed(buffer, length, family):
            return


def collect(
    port_range: tuple[int, int] | None,
    inuse: Mapping[str, int] | None,
    attribute_states: Iterable[str] = ("close_wait",),
    dump_established: bool = False,
    sock: socket.socket | None = None,
    time_wait: int | None = None,
    destinations: bool = True,
    live_info: bool = True,
    settled: Callable[[], bool] | None = None,
    listeners_only: bool = False,
    expect_churn: bool = False,
) -> SocketTable:
    """Dump this namespace's TCP sockets (see the module docstring for the plan).

    ``inuse`` and ``time_wait`` (sockstat) also spare whole dumps, exactly: a family with no full
    socket and no timewait socket has nothing to dump (request sockets need a listener), and once
    dump 1 has seen every full socket of a family, no ESTABLISHED socket is left for dump 2. Each
    dump walks the host-wide hash, so on a node with many namespaces this is most of the saving.

    ``destinations=False`` skips the per-destination work: dump 2 exists only for it (derived
    ESTABLISHED needs no dump), and dump 1 then counts without keying ephemeral sockets. The
    table's ephemeral_use is then empty and established self-connects unseen: the caller reuses
    an earlier poll's (collect.destinations_interval).

    ``live_info`` asks the per-destination dump for each connection's tcp_info (live RTT and
    retransmissions per destination); measured on 6.18 at about +1.1 us of CPU per outbound
    ESTABLISHED connection on each destination scan (benchmarks/bench_live_info.py).

    ``settled`` (derived mode) is asked after the dumps whether the namespace stood still while
    they ran; if not, ESTABLISHED is counted by one more dump of every ESTABLISHED socket (one
    walk, as ``ss`` counts it; the per-destination data stays dump 2's), and the table says
    ``churned``.

    ``listeners_only`` dumps the listening sockets alone: the kernel then walks its listening
    hash and not the established one (inet_diag_dump_icsk), whatever else the host holds. The
    table counts only them (the caller keeps the rest from an earlier poll). A listener is a full
    socket, so a family whose ``inuse`` is 0 has none and is not dumped (an idle namespace: none).

    ``expect_churn`` (the namespace moved during the last poll: a busy host) counts ESTABLISHED
    in the same walk as the other states, skipping the derivation that would most likely need
    a second walk; ``settled`` is still asked, so the table says whether it moved this time.
    Only without ``destinations``: a destination scan keeps its filtered dump.
    """
    families = FAMILIES
    if inuse is not None and (time_wait == 0 or listeners_only):
        families = tuple(family for family in FAMILIES if inuse[family] > 0)
    if listeners_only:
        port_range, inuse, destinations, settled = None, None, False, None
    aggregator = sockdiag.DumpAggregator(port_range if destinations else None, attribute_states)
    walk_once = expect_churn and not destinations and settled is not None
    established_dumped = dump_established or inuse is None or port_range is None or walk_once
    buffer = memoryview(bytearray(1 << 17))
    owned = sock is None
    connection = sock
    sequence = 0

    def dump_one(
        family: str | None,
        mask: int,
        bytecode: bytes,
        extensions: int,
        into: sockdiag.DumpAggregator | netlink.StateCounter,
    ) -> None:
        nonlocal sequence, connection
        if connection is None:
            connection = netlink.open_socket()
        sequence += 1
        request = netlink.build_request(family, mask, bytecode, sequence, extensions)
        try:
            run_dump(connection.send, connection.recv_into, request, family, into, buffer)
        except OSError as error:
            raise SockDiagError(f"sock_diag dump ({family or 'tcp'}) failed: {error}") from error

    both_at_once = True

    def dump(
        wanted: tuple[str, ...],
        mask: int,
        bytecode: bytes = b"",
        extensions: int = 0,
        into: sockdiag.DumpAggregator | netlink.StateCounter = aggregator,
    ) -> None:
        """The sockets of ``wanted`` families: each dump walks the host-wide hash tables whole,
        so two families are asked for in one request (one walk) unless the kernel refuses it."""
        nonlocal both_at_once
        if len(wanted) == 2 and both_at_once:
            before = into.messages
            try:
                dump_one(None, mask, bytecode, extensions, into)
                return
            except netlink.DumpRefused:
                if into.messages != before:
                    raise  # failed part-way: what it fed cannot be taken back
                both_at_once = False  # refused (no TCPDIAG_GETSOCK): one request per family
        for family in wanted:
            dump_one(family, mask, bytecode, extensions, into)

    try:
        first_mask = ALL_STATES_MASK if established_dumped else ALL_STATES_MASK & ~ESTABLISHED_MASK
        if listeners_only:
            first_mask = LISTEN_MASK
        if families and established_dumped:
            # Every socket: the listeners with their drops (the listening hash alone), then all
            # the rest in one walk, with no extension (ESTABLISHED messages are most of it).
            dump(families, LISTEN_MASK, extensions=SKMEMINFO_EXTENSION)
            if first_mask & ~LISTEN_MASK:
                dump(families, first_mask & ~LISTEN_MASK)
        elif families:
            dump(families, first_mask, extensions=SKMEMINFO_EXTENSION)  # listeners' drops
        if destinations and not established_dumped and inuse is not None and port_range:
            bytecode = netlink.port_range_bytecode(*port_range)
            aggregator.read_info = live_info  # live RTT and retransmissions per destination
            extensions = INFO_EXTENSION | SKMEMINFO_EXTENSION if live_info else 0
            unseen = tuple(
                family
                for family in families
                if inuse[family] > aggregator.totals[family].full_sockets
            )
            if unseen:
                dump(unseen, ESTABLISHED_MASK, bytecode, extensions)
        churned = walk_once and settled is not None and not settled()
        if not established_dumped and settled is not None and not settled():
            # The derivation could be wrong: count ESTABLISHED in one walk of it, as ss does,
            # counting only (what dump 2 keyed per destination is not keyed twice).
            churned = established_dumped = True
            walk = netlink.StateCounter()
            dump(FAMILIES, ESTABLISHED_MASK, into=walk)
            for family in FAMILIES:
                aggregator.totals[family].states[TCP_ESTABLISHED] = walk.states[family][
                    TCP_ESTABLISHED
                ]
            aggregator.messages += walk.messages
    finally:
        if owned and connection is not None:
            connection.close()
    table = aggregator.result(inuse, established_dumped)
    return replace(table, churned=True) if churned else table


def with_destinations_of(sockets: SocketTable, earlier: SocketTable) -> SocketTable:
    """This poll's counts with an earlier poll's per-destination data (and its age)."""
    return replace(
        sockets,
        ephemeral_use=earlier.ephemeral_use,
        self_connects=(
            *sockets.self_connects,
            *(c for c in earlier.self_connects if c.state == "established"),
        ),
        destinations_at=earlier.destinations_at,
    )


@netns_source("sockdiag", field="sockets", order=40)
def read_sockets_source(context: SourceContext, so_far: Snapshot) -> SocketTable:
    """The dump, using sysctl and sockstat when they worked (after them in the poll); with
    ``context.earlier`` the per-destination data is reused, not dumped.

    Derived ESTABLISHED (sockstat ``inuse`` minus the other full sockets the dumps saw) is exact
    only if the namespace stood still while the dumps ran. The churn marks (procnet.py) are taken
    before them (from this poll's counters and sockstat reads) and read right after; if any
    moved, the ESTABLISHED sockets the dumps skipped are walked as well, as ``ss`` does (the
    table says ``churned`` and "dumped"). A poll with no connection opened, failed, reset or
    established keeps the cheap derived count.
    """
    settings = context.settings
    sockstat, sysctls = so_far.sockstat, so_far.sysctls
    fresh = context.earlier is None or settings.established != "derived"
    port_range = sysctls.port_range if sysctls is not None else None
    attribute_states = settings.attribute_states if settings.process_attribution else ()
    inuse: dict[str, int] | None = None
    settled: Callable[[], bool] | None = None
    before = None
    if settings.established == "derived" and sockstat is not None:
        try:
            before = procnet.marks_before_dump(context, so_far)
        except (OSError, procnet.ProcParseError):
            before = None  # no way to tell churn: count ESTABLISHED by dumping it
    if before is not None:
        marks = before
        inuse = {"ipv4": marks.inuse_ipv4, "ipv6": marks.inuse_ipv6}

        def settled() -> bool:
            try:
                return (
                    procnet.read_churn_marks(context.paths, True, context.memo, context.netns_inode)
                    == marks
                )
            except (OSError, procnet.ProcParseError):
                return False

    earlier = context.earlier
    kept = _still_true(earlier, before) if before is not None and not fresh else None
    if kept is not None:
        listeners = collect(None, inuse, attribute_states, listeners_only=True)
        if listeners.total("listen") == kept.total("listen"):
            return _unchanged(kept, listeners)
    sockets = collect(
        port_range,
        inuse,
        attribute_states,
        dump_established=before is None,
        time_wait=sockstat.time_wait if sockstat is not None else None,
        destinations=fresh,
        live_info=settings.live_tcp_info,
        settled=settled,
        expect_churn=earlier is not None and earlier.churned,
    )
    if before is not None and not sockets.churned and sockets.established_method == "derived":
        sockets = replace(sockets, marks=before.signature)
    if fresh or context.earlier is None:
        return replace(sockets, destinations_at=context.taken_at)
    return with_destinations_of(sockets, context.earlier)


def _still_true(earlier: SocketTable | None, now: procnet.ChurnMarks) -> SocketTable | None:
    """The earlier table, if it still describes the namespace (else None): it was taken with
    nothing moving, it held no socket a silent timer could have moved since, and the marks read
    now are its own (no segment in or out of the namespace since, no socket hashed or unhashed,
    no timewait socket made or expired), or differ only by timewait sockets that expired
    (``_time_wait_expired``)."""
    if (
        earlier is None
        or not earlier.marks
        or earlier.established_method != "derived"
        or any(earlier.total(state) for state in _TIMED_STATES)
    ):
        return None
    if earlier.marks == now.signature:
        return earlier
    return _time_wait_expired(earlier, now.signature)


def _time_wait_expired(earlier: SocketTable, marks: tuple[int, ...]) -> SocketTable | None:
    """The earlier table less the timewait sockets that expired since, when that is all that
    happened and the count can be placed exactly; else None (the caller walks).

    sockstat's ``tw`` (the signature's last field) counts the timewait sockets of the namespace,
    both families and both substates (TIME_WAIT, and FIN_WAIT2 after close()): the kernel's
    per-namespace ``tcp_death_row.tw_refcount``, which IPv6 shares. With every other mark equal,
    no segment came or went, so none was made (a FIN or its ACK makes one; so does close() of a
    FIN_WAIT2 socket, which unhashes it: ``inuse`` moves) and none was killed by a segment or
    reused by a connect(): a lower ``tw`` is that many expired. They are TIME_WAIT sockets of
    one family when the table held no FIN_WAIT2 socket and TIME_WAIT in one family only; with
    both families holding some, the split is unknown without copying them out.
    """
    then = earlier.marks
    if len(then) != len(marks) or then[:-1] != marks[:-1] or earlier.total("fin_wait2"):
        return None
    expired = then[-1] - marks[-1]
    holding = [family for family, by_state in earlier.counts.items() if by_state["time_wait"]]
    if expired <= 0 or len(holding) != 1:
        return None
    (family,) = holding
    left = earlier.counts[family]["time_wait"] - expired
    if left < 0:
        return None
    counts = {**earlier.counts, family: {**earlier.counts[family], "time_wait": left}}
    return replace(earlier, counts=counts, marks=marks)


def _unchanged(earlier: SocketTable, listeners: SocketTable) -> SocketTable:
    """The earlier table with this poll's listeners (their queues move without a segment: an
    accept() empties one) and this poll's small dump as its cost."""
    counts = {
        family: {**by_state, "listen": listeners.counts[family]["listen"]}
        for family, by_state in earlier.counts.items()
    }
    return replace(
        earlier,
        counts=counts,
        listeners=listeners.listeners,
        messages=listeners.messages,
        unchanged=True,
    )
