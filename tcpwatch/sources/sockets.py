"""The socket-table source: the sock_diag dumps of one namespace (which dumps, in which order;
sockdiag.py parses them), read after sysctl and sockstat, with ESTABLISHED kept exact under churn
and the per-destination data on its own cadence.

The aggregator is looked up on the sockdiag module at each call, so a benchmark can swap it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from tcpwatch.model import FAMILIES, Snapshot, SocketTable, SockStat
from tcpwatch.sources import netlink, procnet, sockdiag
from tcpwatch.sources.base import SourceContext, netns_source
from tcpwatch.sources.netlink import INFO_EXTENSION, SKMEMINFO_EXTENSION, SockDiagError
from tcpwatch.sources.sockdiag import ALL_STATES_MASK, ESTABLISHED_MASK, Receiver


def run_dump(
    send: Callable[[bytes], object],
    receive: Receiver,
    request: bytes,
    family: str,
    aggregator: sockdiag.DumpAggregator,
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
    """
    aggregator = sockdiag.DumpAggregator(port_range if destinations else None, attribute_states)
    established_dumped = dump_established or inuse is None or port_range is None
    families = FAMILIES
    if inuse is not None and time_wait == 0:
        families = tuple(family for family in FAMILIES if inuse[family] > 0)
    buffer = memoryview(bytearray(1 << 17))
    owned = sock is None
    connection = netlink.open_socket() if sock is None and families else sock
    sequence = 0

    def dump(family: str, mask: int, bytecode: bytes = b"", extensions: int = 0) -> None:
        nonlocal sequence
        assert connection is not None
        sequence += 1
        request = netlink.build_request(family, mask, bytecode, sequence, extensions)
        try:
            run_dump(connection.send, connection.recv_into, request, family, aggregator, buffer)
        except OSError as error:
            raise SockDiagError(f"sock_diag dump ({family}) failed: {error}") from error

    try:
        first_mask = ALL_STATES_MASK if established_dumped else ALL_STATES_MASK & ~ESTABLISHED_MASK
        for family in families:
            dump(family, first_mask)
        if destinations and not established_dumped and inuse is not None and port_range:
            bytecode = netlink.port_range_bytecode(*port_range)
            aggregator.read_info = live_info  # live RTT and retransmissions per destination
            extensions = INFO_EXTENSION | SKMEMINFO_EXTENSION if live_info else 0
            for family in families:
                if inuse[family] > aggregator.totals[family].full_sockets:
                    dump(family, ESTABLISHED_MASK, bytecode, extensions)
    finally:
        if owned and connection is not None:
            connection.close()
    return aggregator.result(inuse, established_dumped)


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


def _inuse(sockstat: SockStat) -> dict[str, int]:
    return {"ipv4": sockstat.inuse_ipv4, "ipv6": sockstat.inuse_ipv6}


@netns_source("sockdiag", field="sockets", order=40)
def read_sockets_source(context: SourceContext, so_far: Snapshot) -> SocketTable:
    """The dump, using sysctl and sockstat when they worked (after them in the poll); with
    ``context.earlier`` the per-destination data is reused, not dumped.

    Derived ESTABLISHED is exact only if no full socket was created or destroyed between the
    sockstat read and the dumps. sockstat is read again after them: when ``inuse`` moved, the
    host churned during the poll and ESTABLISHED is counted by dumping it, as ``ss`` does
    (the table then says ``established_method="dumped"``). A quiet host keeps the cheap path.
    """
    settings = context.settings
    sockstat, sysctls = so_far.sockstat, so_far.sysctls
    derived = settings.established == "derived"
    inuse = _inuse(sockstat) if sockstat is not None and derived else None
    fresh = context.earlier is None or not derived
    port_range = sysctls.port_range if sysctls is not None else None
    attribute_states = settings.attribute_states if settings.process_attribution else ()

    def dump(inuse: Mapping[str, int] | None, dump_established: bool) -> SocketTable:
        return collect(
            port_range,
            inuse,
            attribute_states,
            dump_established=dump_established,
            time_wait=sockstat.time_wait if sockstat is not None else None,
            destinations=fresh,
            live_info=settings.live_tcp_info,
        )

    sockets = dump(inuse, not derived)
    if inuse is not None and sockets.established_method == "derived":
        after = _inuse(procnet.read_sockstat(context.paths))
        if after != inuse:
            sockets = replace(dump(None, True), churned=True)
    if fresh or context.earlier is None:
        return replace(sockets, destinations_at=context.taken_at)
    return with_destinations_of(sockets, context.earlier)
