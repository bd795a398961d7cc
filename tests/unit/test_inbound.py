"""The listeners' scan (source ``inbound``): its kernel-side filter run through a model of the
kernel's own checker and interpreter, its aggregation of hand-built messages, and its cadence.

The real kernel runs the same filter and dumps in tests/integration/test_slowness_netns.py.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import replace

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.model import Listener, Snapshot, SocketTable
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import inbound
from tcpwatch.sources.base import SourceContext
from tcpwatch.sources.inbound import (
    EXACT_PORTS,
    INET_DIAG_BC_JMP,
    InboundAggregator,
    listener_ports_bytecode,
    port_filter,
)
from tcpwatch.sources.netlink import (
    INET_DIAG_BC_S_GE,
    INET_DIAG_BC_S_LE,
    INET_DIAG_INFO,
    NLMSG_DONE,
    SockDiagError,
)
from tcpwatch.stalls import InboundScan
from tests.unit.test_liveinfo import SHUTDOWN, attribute, established, info_bytes, skmem

OP = struct.Struct("=BBH")


# --- the bytecode, against a model of net/ipv4/inet_diag.c ----------------------------------


def _valid_cc(program: bytes, cc: int) -> bool:
    """valid_cc(): is there an op ``cc`` bytes before the end on the chain of "yes" jumps?"""
    offset, length = 0, len(program)
    while length >= 0:
        if cc > length:
            return False
        if cc == length:
            return True
        _, yes, _ = OP.unpack_from(program, offset)
        if yes < 4 or yes % 4:
            return False
        length -= yes
        offset += yes
    return False


def audit(program: bytes) -> None:
    """inet_diag_bc_audit() for the ops these programs use (port comparisons and JMP)."""
    offset, length = 0, len(program)
    while length > 0:
        code, yes, no = OP.unpack_from(program, offset)
        minimum = 4
        if code in (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE):
            minimum = 8  # valid_port_comparison(): the op and its operand
            assert length >= minimum
        else:
            assert code == INET_DIAG_BC_JMP
        assert minimum <= no <= length + 4 and no % 4 == 0
        if no < length:
            assert _valid_cc(program, length - no), f"'no' of the op at {offset} is off the chain"
        assert minimum <= yes <= length + 4 and yes % 4 == 0
        offset += yes
        length -= yes
    assert length == 0


def accepts(program: bytes, port: int) -> bool:
    """inet_diag_bc_run(): landing exactly on the end accepts."""
    offset, length = 0, len(program)
    while length > 0:
        code, yes, no = OP.unpack_from(program, offset)
        if code == INET_DIAG_BC_JMP:
            passed = False
        else:
            operand = OP.unpack_from(program, offset + 4)[2]
            passed = port >= operand if code == INET_DIAG_BC_S_GE else port <= operand
        jump = yes if passed else no
        offset += jump
        length -= jump
    return length == 0


@pytest.mark.parametrize("ports", [[80], [80, 443], [22, 80, 443, 8080, 8443], list(range(1, 17))])
def test_listener_ports_filter_accepts_exactly_those_ports(ports: list[int]) -> None:
    program = listener_ports_bytecode(ports)
    audit(program)
    for port in {0, 1, 2, 21, 22, 23, 79, 80, 81, 442, 443, 444, 8080, 8443, 65535, *ports}:
        assert accepts(program, port) == (port in ports), port


def test_beyond_exact_ports_the_filter_keeps_ports_outside_the_ephemeral_range() -> None:
    ports = [*range(1000, 1000 + EXACT_PORTS), 40000]  # one listener inside the range
    program = port_filter(ports, (32768, 60999))
    audit(program)
    for port in (1, 1000, 5000, 32767, 61000, 65535, 40000):
        assert accepts(program, port), port
    for port in (32768, 39999, 40001, 60999):
        assert not accepts(program, port), port
    # exactly EXACT_PORTS ports (or no range known): each port exactly
    assert port_filter(ports[:EXACT_PORTS], (32768, 60999)) == listener_ports_bytecode(
        ports[:EXACT_PORTS]
    )
    assert port_filter(ports, None) == listener_ports_bytecode(sorted(ports))


def test_a_range_reaching_the_ends_leaves_out_the_impossible_comparison() -> None:
    # every port is "inside" a range of 0-65535: the first EXACT_PORTS listener ports only
    program = port_filter(list(range(1, 40)), (0, 65535))
    audit(program)
    assert accepts(program, 1) and not accepts(program, 30) and not accepts(program, 5000)
    program = port_filter(list(range(100, 140)), (1024, 65535))
    audit(program)
    assert accepts(program, 1023) and not accepts(program, 1024) and not accepts(program, 65535)


# --- aggregation ---------------------------------------------------------------------------


def message(
    sport: int,
    local: str,
    remote: str = "10.1.1.1",
    family: int = socket.AF_INET,
    rqueue: int = 0,
    **info: int,
) -> bytes:
    built = bytearray(
        established(
            sport=sport,
            dport=50000,
            rqueue=rqueue,
            attributes=SHUTDOWN + skmem() + attribute(INET_DIAG_INFO, info_bytes(**info)),
        )
    )
    built[16] = family
    built[24:40] = socket.inet_pton(family, local).ljust(16, b"\0")
    built[40:56] = socket.inet_pton(family, remote).ljust(16, b"\0")
    return bytes(built)


DONE = struct.pack("=IHHIIi", 20, NLMSG_DONE, 2, 1, 0, 0)
LISTENERS = (
    Listener("ipv4", "0.0.0.0", 80, 0, 511, 0, 1001, 0),
    Listener("ipv4", "127.0.0.1", 8080, 0, 128, 0, 1002, 0),
    Listener("ipv4", "127.0.0.1", 8080, 0, 128, 0, 1003, 1),  # SO_REUSEPORT sibling
    Listener("ipv6", "::", 443, 0, 4096, 0, 1004, 0),
)


def test_connections_go_to_their_listener_exact_address_then_wildcard() -> None:
    aggregator = InboundAggregator(LISTENERS, limit=100)
    data4 = b"".join(
        [
            message(80, "10.0.0.1", busy_time=2_000_000, rwnd_limited=1_500_000),
            message(80, "127.0.0.1", remote="10.1.1.2", busy_time=1_000_000),
            message(8080, "127.0.0.1", rqueue=70_000),
            message(9999, "127.0.0.1"),  # its listener closed since the poll's dump
            DONE,
        ]
    )
    assert aggregator.feed(data4, len(data4), "ipv4")
    data6 = message(443, "::ffff:10.0.0.1", remote="::ffff:10.1.1.3", family=socket.AF_INET6)
    data6 += DONE
    assert aggregator.feed(data6, len(data6), "ipv6")  # an IPv4 client of the [::] listener
    scan = aggregator.result(complete=True, scanned_at=5.0)
    assert (scan.connections, scan.unmatched, scan.complete, scan.limit) == (5, 1, True, 100)
    by_name = {item.listener: item for item in scan.listeners}
    assert {name: item.stalls.connections for name, item in by_name.items()} == {
        "0.0.0.0:80": 2,
        "127.0.0.1:8080": 1,
        "[::]:443": 1,
    }
    port80 = by_name["0.0.0.0:80"]
    assert (port80.inode, port80.stalls.busy_seconds, port80.stalls.rwnd_limited_seconds) == (
        1001,
        3.0,
        1.5,
    )
    assert [(c.local, c.remote) for c in port80.stalls.worst] == [("10.0.0.1:80", "10.1.1.1:50000")]
    assert by_name["127.0.0.1:8080"].inode == 1002  # the group's first socket
    assert by_name["127.0.0.1:8080"].stalls.receive_queue_max_bytes == 70_000
    assert by_name["[::]:443"].stalls.worst == ()


def test_the_limit_cuts_the_scan_and_says_so() -> None:
    aggregator = InboundAggregator(LISTENERS, limit=2)
    data = b"".join(message(80, "10.0.0.1") for _ in range(3)) + DONE
    assert aggregator.feed(data, len(data), "ipv4")  # stops at the limit, before DONE
    scan = aggregator.result(complete=True, scanned_at=5.0)
    assert (scan.connections, scan.complete) == (2, False)


def test_garbage_raises() -> None:
    aggregator = InboundAggregator(LISTENERS, limit=10)
    with pytest.raises(SockDiagError, match="bad netlink message length"):
        aggregator.feed(b"\xff" * 20, 20, "ipv4")


# --- the source: the per-destination cadence ------------------------------------------------


def snapshot(inbound_scan: InboundScan | None = None) -> Snapshot:
    table = SocketTable({}, LISTENERS, (), (), (), {}, "derived", 0)
    return Snapshot("host", 1.0, table, None, None, None, None, inbound=inbound_scan)


def test_polls_between_destination_scans_keep_the_previous_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[float] = []

    def fake_scan(
        listeners: object, port_range: object, limit: int, scanned_at: float
    ) -> InboundScan:
        calls.append(scanned_at)
        return InboundScan((), 0, limit, True, 0, scanned_at)

    monkeypatch.setattr(inbound, "scan", fake_scan)

    def read(context: SourceContext, so_far: Snapshot) -> InboundScan:
        value = inbound.read_inbound_source.read(context, (so_far,))
        assert isinstance(value, InboundScan)
        return value

    settings = CollectSettings()
    context = SourceContext(ProcPaths(), settings, "host", 0, 10.0)
    first = read(context, snapshot())
    assert calls == [10.0] and first.limit == 2048
    # next poll reuses the destinations (earlier set): the scan is kept, not repeated
    table = snapshot().sockets
    assert table is not None
    later = replace(context, taken_at=25.0, earlier=table, previous=snapshot(first))
    assert read(later, snapshot()) is first
    assert calls == [10.0]
    # without a previous scan (it failed), or on a destination-scan poll, it scans
    read(replace(later, previous=snapshot()), snapshot())
    read(replace(later, earlier=None), snapshot())
    assert calls == [10.0, 25.0, 25.0]
