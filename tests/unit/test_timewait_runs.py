"""Runs of timewait messages counted by columns (timewait_runs.py) give exactly what the
per-message path gives: hand-built datagrams of the shapes a churning namespace's dump holds,
parsed once with the run counter and once with it switched off."""

from __future__ import annotations

import socket
import struct

import pytest

from tcpwatch.model import SocketTable
from tcpwatch.sources import sockdiag
from tcpwatch.sources.netlink import TCPDIAG_GETSOCK
from tcpwatch.sources.sockdiag import INET_DIAG_SHUTDOWN, DumpAggregator
from tcpwatch.sources.timewait_runs import timewait_run

V4, V6 = socket.AF_INET, socket.AF_INET6
MARK = struct.pack("=HH", 8, 15) + bytes(4)  # INET_DIAG_MARK: what 6.18 adds for CAP_NET_ADMIN


def message(
    family: int = V4,
    state: int = 6,
    timer: int = 3,
    sport: int = 40000,
    dport: int = 7100,
    attributes: bytes = b"",
    inode: int = 0,
) -> bytes:
    """One inet_diag answer of a both-families dump, loopback addresses."""
    local = socket.inet_pton(family, "127.0.0.1" if family == V4 else "::1")
    address = local.ljust(16, b"\0")
    body = bytes([family, state, timer, 0]) + struct.pack("!HH", sport, dport)
    body += address + address + struct.pack("=IIIIIIII", 0, 0, 0, 30000, 0, 0, 1000, inode)
    length = 16 + len(body) + len(attributes)
    return struct.pack("=IHHII", length, TCPDIAG_GETSOCK, 2, 1, 0) + body + attributes


def established(sport: int, family: int = V4) -> bytes:
    shutdown = struct.pack("=HH", 5, INET_DIAG_SHUTDOWN) + b"\0\0\0\0"
    return message(family, 1, 0, sport, 7100, shutdown, inode=sport)


def timewaits(
    count: int, family: int = V4, state: int = 6, first_port: int = 40000, mark: bool = True
) -> bytes:
    """Timewait sockets' messages: 96 bytes as root reads them on 6.18, 88 without the mark."""
    extra = MARK if mark else b""
    return b"".join(message(family, state, 3, first_port + n, 7100, extra) for n in range(count))


def parse(datagrams: list[bytes], runs: bool, monkeypatch: pytest.MonkeyPatch) -> SocketTable:
    with monkeypatch.context() as patch:
        if not runs:
            patch.setattr(sockdiag, "timewait_run", lambda *_: 0)
        aggregator = DumpAggregator(None)
        for datagram in datagrams:
            assert not aggregator.feed(memoryview(bytearray(datagram)), len(datagram), None)
    return aggregator.result(None, True)


DATAGRAMS = {
    "all time-wait": [timewaits(300)],
    "all time-wait, no mark attribute": [timewaits(300, mark=False)],
    "with and without the mark": [timewaits(30) + timewaits(20, mark=False) + timewaits(9)],
    "fin-wait2 among them": [timewaits(40) + timewaits(3, state=5) + timewaits(50)],
    "both families interleaved": [
        timewaits(20) + timewaits(30, V6) + timewaits(7) + timewaits(1, V6)
    ],
    "established in between": [
        timewaits(10) + established(50000) + timewaits(12) + established(50001)
    ],
    "self-connects in a run": [
        timewaits(10)
        + message(sport=45000, dport=45000)
        + timewaits(5)
        + message(state=5, sport=45001, dport=45001)
        + message(sport=45002, dport=45002)
    ],
    "lone ones": [established(50000) + timewaits(1) + established(50001) + timewaits(1)],
    "several datagrams": [timewaits(200), timewaits(1) + established(50002), timewaits(2)],
    "a non-timewait timer, and a retransmit count": [
        timewaits(5)
        + message(state=6, timer=0)
        + timewaits(4)
        + message(state=6, timer=3)[:19]
        + b"\x01"
        + message()[20:]
        + timewaits(3)
    ],
}


@pytest.mark.parametrize("name", sorted(DATAGRAMS))
def test_counts_equal_the_per_message_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    datagrams = DATAGRAMS[name]
    by_runs = parse(datagrams, True, monkeypatch)
    one_by_one = parse(datagrams, False, monkeypatch)
    assert by_runs == one_by_one
    assert sum(by_runs.counts["ipv4"].values()) + sum(by_runs.counts["ipv6"].values()) > 0


def test_runs_stop_where_a_message_would_not_merely_be_counted() -> None:
    def run(data: bytes, offset: int = 0) -> tuple[int, list[int]]:
        states = [0] * 13
        size = struct.unpack_from("=I", data, offset)[0]
        return timewait_run(memoryview(data), offset, size, len(data), states), states

    assert run(timewaits(300)) == (300, [0] * 6 + [300] + [0] * 6)
    assert run(timewaits(4) + timewaits(2, state=5)) == (6, [0] * 5 + [2, 4] + [0] * 6)
    assert run(timewaits(4) + timewaits(2, V6))[0] == 4
    assert run(timewaits(4) + message(sport=9, dport=9) + timewaits(9))[0] == 4
    assert run(timewaits(4) + established(50000))[0] == 4
    assert run(timewaits(4) + message(timer=0))[0] == 4
    assert run(timewaits(4) + message(state=7))[0] == 4
    assert run(timewaits(3), 96) == (2, [0] * 6 + [2] + [0] * 6)
    assert run(timewaits(3, mark=False) + timewaits(2))[0] == 3
    assert run(timewaits(5, mark=False))[0] == 5
    odd = message(attributes=struct.pack("=HH", 6, 99) + b"\0\0")  # 94 bytes: no stride
    assert run(odd + odd + odd) == (0, [0] * 13)
    assert run(timewaits(1) + established(50000)) == (0, [0] * 13)
    assert run(message(sport=9, dport=9) + timewaits(5)) == (0, [0] * 13)
