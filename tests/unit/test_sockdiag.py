"""sock_diag parsing: replays of real recorded dumps, and hand-built messages for the edge cases.

The recordings (tests/fixtures/netlink, see its README) hold a known population; expectations are
written out here and cross-checked against the `ss -tanHe` listing taken at the same moment.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tcpwatch.model import STATES, Destination, DestinationUse, Listener, SocketTable
from tcpwatch.sources.netlink import (
    INET_DIAG_BC_S_GE,
    INET_DIAG_BC_S_LE,
    INET_DIAG_REQ_BYTECODE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    TCPDIAG_GETSOCK,
    SockDiagError,
    StateCounter,
    build_request,
    port_range_bytecode,
)
from tcpwatch.sources.sockdiag import (
    ALL_STATES_MASK,
    ESTABLISHED_MASK,
    INET_DIAG_SHUTDOWN,
    DumpAggregator,
)
from tcpwatch.sources.sockets import LISTEN_MASK, collect, run_dump
from tests.tools.record_dump import read_frames, recorded_receiver, state_mask

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "netlink"
META = json.loads((FIXTURES / "mixed.json").read_text())
PORT_RANGE = (32768, 60999)
INUSE = {"ipv4": 45, "ipv6": 11}
FULL_DUMPS = (("mixed-ipv4-all.bin", "ipv4"), ("mixed-ipv6-all.bin", "ipv6"))
COLLECT_DUMPS = (
    ("mixed-ipv4-no-established.bin", "ipv4"),
    ("mixed-ipv6-no-established.bin", "ipv6"),
    ("mixed-ipv4-established-ephemeral.bin", "ipv4"),
    ("mixed-ipv6-established-ephemeral.bin", "ipv6"),
)
EXPECTED_COUNTS = {
    "ipv4": {"established": 35, "syn_sent": 2, "syn_recv": 5, "time_wait": 2, "listen": 8},
    "ipv6": {"established": 6, "syn_recv": 5, "fin_wait2": 2, "close_wait": 2, "listen": 2},
}
SS_STATES = {
    "ESTAB": "established",
    "SYN-SENT": "syn_sent",
    "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1",
    "FIN-WAIT-2": "fin_wait2",
    "TIME-WAIT": "time_wait",
    "CLOSE-WAIT": "close_wait",
    "LAST-ACK": "last_ack",
    "LISTEN": "listen",
    "CLOSING": "closing",
}


# --- the ss listing recorded beside the dumps -------------------------------------------------


@dataclass(frozen=True, slots=True)
class SsLine:
    family: str
    state: str
    recv_q: int
    send_q: int
    local: str
    local_port: int
    peer: str
    peer_port: int | None
    inode: int


def _endpoint(text: str) -> tuple[str, int | None]:
    address, _, port = text.rpartition(":")
    address = address.strip("[]")
    return ("::" if address == "*" else address), (None if port == "*" else int(port))


def ss_lines() -> list[SsLine]:
    """`ss -tanHe` as recorded: "LISTEN 0 16 0.0.0.0:5000 0.0.0.0:* ino:70633 sk:.. <->"."""
    lines = []
    for text in (FIXTURES / "mixed.ss-e").read_text().splitlines():
        words = text.split()
        local, local_port = _endpoint(words[3])
        peer, peer_port = _endpoint(words[4])
        assert local_port is not None
        inode = next(int(word[4:]) for word in words if word.startswith("ino:"))
        family = "ipv6" if words[3].startswith(("[", "*")) else "ipv4"
        lines.append(
            SsLine(
                family,
                SS_STATES[words[0]],
                int(words[1]),
                int(words[2]),
                local,
                local_port,
                peer,
                peer_port,
                inode,
            )
        )
    return lines


def ss_counts() -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {"ipv4": Counter(), "ipv6": Counter()}
    for line in ss_lines():
        counts[line.family][line.state] += 1
    return {family: dict(counter) for family, counter in counts.items()}


# --- replay helpers ---------------------------------------------------------------------------


def replay(
    files: Iterable[tuple[str, str]],
    port_range: tuple[int, int] | None = PORT_RANGE,
    inuse: dict[str, int] | None = None,
    established_dumped: bool = True,
) -> SocketTable:
    aggregator = DumpAggregator(port_range)
    buffer = memoryview(bytearray(1 << 17))
    for name, family in files:
        sent: list[bytes] = []
        run_dump(
            sent.append,
            recorded_receiver(read_frames(FIXTURES / name)),
            b"request",
            family,
            aggregator,
            buffer,
        )
        assert sent == [b"request"]
    return aggregator.result(inuse, established_dumped)


def nonzero(counts: SocketTable) -> dict[str, dict[str, int]]:
    return {
        family: {state: n for state, n in by_state.items() if n}
        for family, by_state in counts.counts.items()
    }


def messages(name: str) -> Iterator[bytes]:
    """Every netlink message of a recording, NLMSG_DONE included."""
    for datagram in read_frames(FIXTURES / name):
        offset = 0
        while offset < len(datagram):
            (length,) = struct.unpack_from("=I", datagram, offset)
            yield datagram[offset : offset + length]
            offset += (length + 3) & ~3


def attribute_kinds(message: bytes) -> list[int]:
    kinds, offset = [], 88
    while offset + 4 <= len(message):
        length, kind = struct.unpack_from("=HH", message, offset)
        kinds.append(kind)
        offset += (length + 3) & ~3
    return kinds


# --- replays of the recorded population ---------------------------------------------------------


def test_recordings_are_what_the_metadata_says() -> None:
    assert META["sockstat_inuse"] == INUSE
    assert tuple(META["port_range"]) == PORT_RANGE
    for name, request in META["files"].items():
        assert (FIXTURES / name).is_file()
        last = list(messages(name))[-1]
        assert struct.unpack_from("=IH", last) == (20, NLMSG_DONE), name
        assert request["family"] in name


def test_full_dumps_count_what_ss_showed() -> None:
    table = replay(FULL_DUMPS)
    assert nonzero(table) == EXPECTED_COUNTS == ss_counts()
    assert set(table.counts["ipv4"]) == set(STATES)
    assert table.established_method == "dumped"
    assert table.messages == len(ss_lines()) == 69
    assert table.total("syn_recv") == 10


def test_collect_plan_derives_inbound_established_from_sockstat() -> None:
    """Dump 1 without ESTABLISHED + dump 2 of ephemeral-port ESTABLISHED + sockstat inuse gives
    the same counts as dumping everything, from fewer messages."""
    derived = replay(COLLECT_DUMPS, inuse=INUSE, established_dumped=False)
    full = replay(FULL_DUMPS)
    assert derived.established_method == "derived"
    assert dict(derived.counts) == dict(full.counts)
    assert derived.listeners == full.listeners
    assert derived.ephemeral_use == full.ephemeral_use
    assert derived.syn_sent == full.syn_sent
    assert derived.self_connects == full.self_connects
    assert derived.inodes_by_state == full.inodes_by_state
    assert derived.messages == 55 < full.messages


def test_derived_established_never_goes_below_what_was_seen() -> None:
    # sockstat read a moment earlier, before some sockets were created: no negative estimate.
    table = replay(COLLECT_DUMPS, inuse={"ipv4": 0, "ipv6": 0}, established_dumped=False)
    assert table.counts["ipv4"]["established"] == 23  # only the dumped ephemeral ones
    assert table.counts["ipv6"]["established"] == 4


def ss_listener_inodes() -> dict[tuple[str, str, int], list[int]]:
    inodes: dict[tuple[str, str, int], list[int]] = {}
    for line in ss_lines():
        if line.state == "listen":
            inodes.setdefault((line.family, line.local, line.local_port), []).append(line.inode)
    return {key: sorted(values) for key, values in inodes.items()}


def test_listeners_queues_and_syn_queues() -> None:
    inodes = ss_listener_inodes()

    def listener(
        family: str, address: str, port: int, length: int, maximum: int, syn: int, index: int = 0
    ) -> Listener:
        inode = inodes[(family, address, port)][index]
        return Listener(family, address, port, length, maximum, syn, inode, index)

    assert replay(FULL_DUMPS).listeners == (
        listener("ipv4", "0.0.0.0", 5000, 2, 16, 0),
        # 3 IPv4 SYNs (IPv6-family request sockets with mapped addresses) + 2 IPv6 SYNs.
        listener("ipv6", "::", 5001, 0, 32, 5),
        listener("ipv4", "127.0.0.1", 5002, 0, 8, 0, 0),
        listener("ipv4", "127.0.0.1", 5002, 0, 8, 0, 1),
        listener("ipv6", "::1", 5003, 0, 8, 0),
        # Request sockets carry 127.0.0.1, the wildcard listener owns them.
        listener("ipv4", "0.0.0.0", 5004, 0, 16, 2),
        # The kernel does not say which reuseport socket a request is queued on: index 0 gets all.
        listener("ipv4", "127.0.0.1", 5005, 0, 16, 3, 0),
        listener("ipv4", "127.0.0.1", 5005, 0, 16, 0, 1),
        # A full accept queue reads max + 1.
        listener("ipv4", "127.0.0.1", 5006, 3, 2, 0),
        listener("ipv4", "127.0.0.1", 40000, 0, 8, 0),
    )


def test_listener_queues_match_ss() -> None:
    by_inode = {line.inode: line for line in ss_lines() if line.state == "listen"}
    listeners = replay(FULL_DUMPS).listeners
    assert len(listeners) == len(by_inode) == 10
    for listener in listeners:
        line = by_inode[listener.inode]
        assert (listener.queue_length, listener.queue_max) == (line.recv_q, line.send_q)
        assert (listener.address, listener.port) == (line.local, line.local_port)


def test_request_sockets_total_what_ss_showed_per_port() -> None:
    per_port = Counter(line.local_port for line in ss_lines() if line.state == "syn_recv")
    from_dump: Counter[int] = Counter()
    for listener in replay(FULL_DUMPS).listeners:
        from_dump[listener.port] += listener.syn_recv
    assert +from_dump == per_port == Counter({5001: 5, 5004: 2, 5005: 3})


def test_ephemeral_use_per_destination() -> None:
    expected = (
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5000, 7, 2),
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5002, 4, 0),
        DestinationUse("ipv6", "::1", "::1", 5003, 4, 0),  # 2 ESTABLISHED + 2 FIN_WAIT2
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5001, 3, 0),
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5005, 3, 0),
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5006, 3, 0),
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5004, 2, 0),
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 5009, 2, 0),
        DestinationUse("ipv6", "::1", "::1", 5001, 2, 0),
        # The client only: the server side's port 40000 is a listening port.
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 40000, 1, 0),
        DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 45000, 1, 0),
    )
    assert replay(FULL_DUMPS).ephemeral_use == expected
    # The same from ss: 4-tuple states, local port in the range and not a listening port.
    listen_ports = {line.local_port for line in ss_lines() if line.state == "listen"}
    from_ss: Counter[tuple[str, str, str, int | None]] = Counter()
    for line in ss_lines():
        if (
            line.state not in {"listen", "syn_recv"}
            and PORT_RANGE[0] <= line.local_port <= PORT_RANGE[1]
            and line.local_port not in listen_ports
        ):
            from_ss[(line.family, line.local, line.peer, line.peer_port)] += 1
    assert from_ss == {(u.family, u.source, u.address, u.port): u.sockets for u in expected}


def test_no_ephemeral_use_without_a_port_range() -> None:
    table = replay(FULL_DUMPS, port_range=None)
    assert table.ephemeral_use == ()
    assert nonzero(table) == EXPECTED_COUNTS


def test_syn_sent_self_connects_and_close_wait_inodes() -> None:
    table = replay(FULL_DUMPS)
    assert table.syn_sent == (Destination("ipv4", "127.0.0.1", 5009, 2),)
    (self_connect,) = table.self_connects
    (ss_self,) = [line for line in ss_lines() if line.local_port == line.peer_port == 45000]
    assert (self_connect.family, self_connect.address, self_connect.port) == (
        "ipv4",
        "127.0.0.1",
        45000,
    )
    assert (self_connect.state, self_connect.inode) == ("established", ss_self.inode)
    close_wait = {line.inode for line in ss_lines() if line.state == "close_wait"}
    assert len(close_wait) == 2
    assert table.inodes_by_state == {"close_wait": frozenset(close_wait)}


def test_attribution_states_are_configurable() -> None:
    aggregator = DumpAggregator(
        PORT_RANGE, attribute_states=("close_wait", "fin_wait2", "syn_sent")
    )
    for name, family in FULL_DUMPS:
        run_dump(
            lambda _: None,
            recorded_receiver(read_frames(FIXTURES / name)),
            b"",
            family,
            aggregator,
            memoryview(bytearray(1 << 17)),
        )

    def from_ss(state: str) -> frozenset[int]:
        # Timewait sockets (the orphan FIN_WAIT2) have inode 0: nothing to attribute.
        return frozenset(line.inode for line in ss_lines() if line.state == state and line.inode)

    assert aggregator.result(None, True).inodes_by_state == {
        "close_wait": from_ss("close_wait"),
        "fin_wait2": from_ss("fin_wait2"),
        "syn_sent": from_ss("syn_sent"),
    }
    assert [len(from_ss(state)) for state in ("close_wait", "fin_wait2", "syn_sent")] == [2, 1, 2]


def test_bytecode_dump_holds_only_ephemeral_local_ports() -> None:
    """The kernel ran our bytecode: dump 2 holds exactly the ESTABLISHED sockets ss saw with a
    local port in 32768-60999."""
    for family in ("ipv4", "ipv6"):
        name = f"mixed-{family}-established-ephemeral.bin"
        ports = sorted(
            struct.unpack_from("!H", message, 20)[0]
            for message in messages(name)
            if struct.unpack_from("=H", message, 4)[0] == SOCK_DIAG_BY_FAMILY
        )
        expected = sorted(
            line.local_port
            for line in ss_lines()
            if line.family == family
            and line.state == "established"
            and PORT_RANGE[0] <= line.local_port <= PORT_RANGE[1]
        )
        assert ports == expected
        assert len(ports) == {"ipv4": 23, "ipv6": 4}[family]


def test_recorded_message_shapes() -> None:
    """What the kernel sends (6.18, root): request sockets as state 3 without SHUTDOWN,
    timewait sockets with timer 3, full sockets with SHUTDOWN: the markers feed() relies on."""
    shapes: Counter[tuple[str, int, int, bool]] = Counter()
    for name, family in FULL_DUMPS:
        for message in messages(name):
            if struct.unpack_from("=H", message, 4)[0] != SOCK_DIAG_BY_FAMILY:
                continue
            state, timer = message[17], message[18]
            full = INET_DIAG_SHUTDOWN in attribute_kinds(message)
            shapes[(family, state, timer, full)] += 1
    assert shapes == {
        ("ipv4", 10, 0, True): 8,  # LISTEN
        ("ipv4", 1, 0, True): 35,  # ESTABLISHED
        ("ipv4", 2, 1, True): 2,  # SYN_SENT, retransmit timer
        ("ipv4", 3, 1, False): 5,  # request sockets on 0.0.0.0:5004 and 127.0.0.1:5005 ...
        ("ipv4", 6, 3, False): 2,  # TIME_WAIT
        ("ipv6", 10, 0, True): 2,
        ("ipv6", 1, 0, True): 6,
        ("ipv6", 3, 1, False): 5,  # ... and on [::]:5001
        ("ipv6", 8, 0, True): 2,  # CLOSE_WAIT
        ("ipv6", 5, 0, True): 1,  # FIN_WAIT2, full socket
        ("ipv6", 5, 3, False): 1,  # FIN_WAIT2, orphan timewait socket
    }


# --- collect() against a socket replaying the recordings -----------------------------------------


@dataclass(frozen=True)
class Request:
    """A dump request as the kernel reads it: v2 (one family) or TCPDIAG_GETSOCK (both)."""

    family: str | None
    states: int
    extensions: int
    bytecode: bytes

    @classmethod
    def parse(cls, data: bytes) -> Request:
        kind = struct.unpack_from("=H", data, 4)[0]
        if kind == TCPDIAG_GETSOCK:
            assert data[16] == socket.AF_UNSPEC
            extensions, states, attributes = data[19], struct.unpack_from("=I", data, 68)[0], 76
        else:
            assert kind == SOCK_DIAG_BY_FAMILY
            extensions, states, attributes = data[18], struct.unpack_from("=I", data, 20)[0], 72
        family = {0: None, int(socket.AF_INET): "ipv4", int(socket.AF_INET6): "ipv6"}[data[16]]
        bytecode = b""
        if len(data) > attributes:
            assert data[attributes : attributes + 4] == struct.pack(
                "=HH", len(data) - attributes, 1
            )
            bytecode = data[attributes + 4 :]
        return cls(family, states, extensions, bytecode)


def retyped(datagram: bytes, kind: int) -> bytes:
    """A recorded datagram whose inet_diag messages carry ``kind``, as the kernel types the
    answers to a TCPDIAG_GETSOCK request."""
    data = bytearray(datagram)
    offset = 0
    while offset + 16 <= len(data):
        length, current = struct.unpack_from("=IH", data, offset)
        if current == SOCK_DIAG_BY_FAMILY:
            struct.pack_into("=H", data, offset + 4, kind)
        offset += (length + 3) & ~3
    return bytes(data)


def without_done(datagrams: Iterable[bytes]) -> list[bytes]:
    """Recorded datagrams less the final NLMSG_DONE (the one that holds only it)."""
    frames = list(datagrams)
    assert frames[-1] == frames[-1][:20] and struct.unpack_from("=H", frames[-1], 4)[0] == 3
    return frames[:-1]


class ReplaySocket:
    """Answers each request with the recording made for the same family, mask and filter; a
    request for both families with the IPv4 recording, then the IPv6 one (one DONE)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self._pending: Iterator[bytes] = iter(())

    def recording(self, family: str, request: Request) -> list[bytes]:
        if request.states == ALL_STATES_MASK:
            name = f"mixed-{family}-all.bin"
        elif request.states == ALL_STATES_MASK & ~ESTABLISHED_MASK:
            name = f"mixed-{family}-no-established.bin"
        elif request.bytecode:
            assert request.states == ESTABLISHED_MASK
            assert request.bytecode == port_range_bytecode(*PORT_RANGE)
            name = f"mixed-{family}-established-ephemeral.bin"
        else:  # any other mask: the full recording's sockets in those states, then DONE
            everything = messages(f"mixed-{family}-all.bin")
            kept = [m for m in everything if len(m) >= 88 and request.states >> m[17] & 1]
            return [b"".join(m.ljust((len(m) + 3) & ~3, b"\0") for m in kept), DONE]
        return list(read_frames(FIXTURES / name))

    def send(self, data: bytes) -> int:
        self.requests.append(bytes(data))
        request = Request.parse(data)
        if request.family is None:
            frames = without_done(self.recording("ipv4", request))
            frames += self.recording("ipv6", request)
            frames = [retyped(frame, TCPDIAG_GETSOCK) for frame in frames]
        else:
            frames = self.recording(request.family, request)
        self._pending = iter(frames)
        return len(data)

    def recv_into(self, buffer: memoryview) -> int:
        chunk = next(self._pending, b"")
        buffer[: len(chunk)] = chunk
        return len(chunk)


def asked(fake: ReplaySocket) -> list[tuple[str | None, int, int]]:
    return [
        (request.family, request.states, request.extensions)
        for request in map(Request.parse, fake.requests)
    ]


def test_collect_walks_twice_for_both_families_and_derives_established() -> None:
    fake = ReplaySocket()
    table = collect(PORT_RANGE, INUSE, sock=cast(socket.socket, fake))
    # One walk of the hash tables per request, each for both families: the states but
    # ESTABLISHED, then the ephemeral ESTABLISHED ones with their tcp_info (INET_DIAG_INFO).
    # idiag_ext: the first asks for the listeners' SKMEMINFO (64), the per-destination one
    # for tcp_info and socket memory (INET_DIAG_INFO 2 + SKMEMINFO 64)
    assert asked(fake) == [
        (None, ALL_STATES_MASK & ~ESTABLISHED_MASK, 64),
        (None, ESTABLISHED_MASK, 66),
    ]
    assert [struct.unpack_from("=I", request, 8)[0] for request in fake.requests] == [1, 2]
    assert table.established_method == "derived"
    assert nonzero(table) == EXPECTED_COUNTS
    assert table == replay(COLLECT_DUMPS, inuse=INUSE, established_dumped=False)


class RefusingSocket(ReplaySocket):
    """A kernel without TCPDIAG_GETSOCK: that request gets an NLMSG_ERROR, nothing else."""

    def send(self, data: bytes) -> int:
        if Request.parse(data).family is None:
            self.requests.append(bytes(data))
            self._pending = iter([error_message(errno.EOPNOTSUPP)])
            return len(data)
        return super().send(data)


def test_collect_asks_per_family_when_the_kernel_refuses_both_at_once() -> None:
    fake = RefusingSocket()
    table = collect(PORT_RANGE, INUSE, sock=cast(socket.socket, fake))
    no_established = ALL_STATES_MASK & ~ESTABLISHED_MASK
    assert asked(fake) == [
        (None, no_established, 64),
        ("ipv4", no_established, 64),
        ("ipv6", no_established, 64),
        ("ipv4", ESTABLISHED_MASK, 66),  # refused once: not asked again in this poll
        ("ipv6", ESTABLISHED_MASK, 66),
    ]
    assert table == collect(PORT_RANGE, INUSE, sock=cast(socket.socket, ReplaySocket()))


def test_collect_asks_one_family_when_the_other_has_no_socket() -> None:
    fake = ReplaySocket()
    collect(PORT_RANGE, {"ipv4": 45, "ipv6": 0}, sock=cast(socket.socket, fake), time_wait=0)
    assert [family for family, _, _ in asked(fake)] == ["ipv4", "ipv4"]


def test_collect_keeps_what_a_failed_walk_fed() -> None:
    class FailingLate(ReplaySocket):
        def send(self, data: bytes) -> int:
            length = super().send(data)
            frames = list(self._pending)
            self._pending = iter([*frames[:-1], DONE[:16] + struct.pack("=i", -errno.EINTR)])
            return length

    with pytest.raises(SockDiagError, match="EINTR"):
        collect(PORT_RANGE, INUSE, sock=cast(socket.socket, FailingLate()))


class ChurnReplaySocket(ReplaySocket):
    """Also answers the churn walk (every ESTABLISHED socket, no filter) with the recording of
    all states: the walk keeps only its ESTABLISHED count."""

    def recording(self, family: str, request: Request) -> list[bytes]:
        if request.states == ESTABLISHED_MASK and not request.bytecode:
            return list(read_frames(FIXTURES / f"mixed-{family}-all.bin"))
        return super().recording(family, request)


def test_collect_walks_established_when_the_namespace_moved() -> None:
    fake = ChurnReplaySocket()
    asked_settled: list[bool] = []

    def moved() -> bool:
        asked_settled.append(True)
        return False

    # inuse far off: a derived count would show it; the walk does not use it.
    table = collect(PORT_RANGE, {"ipv4": 1000, "ipv6": 1000}, sock=cast(socket.socket, fake),
                    settled=moved)  # fmt: skip
    assert asked_settled == [True]
    # one walk for both families, nothing asked beyond the sockets
    walks = [Request.parse(request) for request in fake.requests[2:]]
    assert walks == [Request(None, ESTABLISHED_MASK, 0, b"")]
    assert (table.established_method, table.churned) == ("dumped", True)
    assert nonzero(table) == EXPECTED_COUNTS
    # the per-destination data is dump 2's alone, not keyed again by the walk
    derived = collect(PORT_RANGE, INUSE, sock=cast(socket.socket, ReplaySocket()))
    assert table.ephemeral_use == derived.ephemeral_use
    assert table.self_connects == derived.self_connects


def test_collect_walks_once_when_the_last_poll_churned() -> None:
    """A busy namespace (the last poll moved): ESTABLISHED is counted in the walk of every
    state, not derived and then walked again; the marks still say whether it moved."""
    for moved in (True, False):
        fake = ChurnReplaySocket()
        table = collect(PORT_RANGE, {"ipv4": 1000, "ipv6": 1000}, sock=cast(socket.socket, fake),
                        destinations=False, settled=lambda moved=moved: not moved,
                        expect_churn=True)  # fmt: skip
        assert asked(fake) == [
            (None, LISTEN_MASK, 64),
            (None, ALL_STATES_MASK & ~LISTEN_MASK, 0),
        ]
        assert (table.established_method, table.churned) == ("dumped", moved)
        assert nonzero(table) == EXPECTED_COUNTS
        assert table.ephemeral_use == ()  # counted, never keyed: no destination scan
    # A destination scan keeps its filtered dump (and derives, walking again if it moved).
    fake = ChurnReplaySocket()
    collect(PORT_RANGE, INUSE, sock=cast(socket.socket, fake), settled=lambda: True,
            expect_churn=True)  # fmt: skip
    assert [states for _, states, _ in asked(fake)] == [
        ALL_STATES_MASK & ~ESTABLISHED_MASK,
        ESTABLISHED_MASK,
    ]


def test_collect_keeps_the_derived_count_when_the_namespace_stood_still() -> None:
    fake = ChurnReplaySocket()
    table = collect(PORT_RANGE, INUSE, sock=cast(socket.socket, fake), settled=lambda: True)
    assert len(fake.requests) == 2
    assert (table.established_method, table.churned) == ("derived", False)
    assert nonzero(table) == EXPECTED_COUNTS


def test_collect_without_live_info_asks_for_no_tcp_info() -> None:
    fake = ReplaySocket()
    table = collect(PORT_RANGE, INUSE, sock=cast(socket.socket, fake), live_info=False)
    assert [extensions for _, _, extensions in asked(fake)] == [64, 0]
    assert all(use.established == 0 and use.rtt_mean_seconds is None for use in table.ephemeral_use)


@pytest.mark.parametrize(
    ("port_range", "inuse", "dump_established"),
    [(PORT_RANGE, INUSE, True), (None, INUSE, False), (PORT_RANGE, None, False)],
)
def test_collect_dumps_everything_without_range_or_inuse(
    port_range: tuple[int, int] | None, inuse: dict[str, int] | None, dump_established: bool
) -> None:
    fake = ReplaySocket()
    table = collect(
        port_range, inuse, dump_established=dump_established, sock=cast(socket.socket, fake)
    )
    # The listeners with their drops (SKMEMINFO, 64), then every other socket in one walk.
    assert asked(fake) == [(None, LISTEN_MASK, 64), (None, ALL_STATES_MASK & ~LISTEN_MASK, 0)]
    assert table.established_method == "dumped"
    assert nonzero(table) == EXPECTED_COUNTS
    assert (
        table.counts
        == collect(
            port_range,
            inuse,
            dump_established=dump_established,
            sock=cast(socket.socket, RefusingSocket()),
        ).counts
    )


def test_collect_reports_a_dump_cut_short() -> None:
    class Truncated(ReplaySocket):
        def send(self, data: bytes) -> int:
            length = super().send(data)
            self._pending = iter(list(self._pending)[:-1])  # drop the NLMSG_DONE datagram
            return length

    with pytest.raises(SockDiagError, match="netlink socket closed before the dump ended"):
        collect(PORT_RANGE, INUSE, sock=cast(socket.socket, Truncated()))


def test_collect_wraps_socket_errors() -> None:
    class Failing(ReplaySocket):
        def recv_into(self, buffer: memoryview) -> int:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    with pytest.raises(SockDiagError, match=r"sock_diag dump \(tcp\) failed: .*No buffer space"):
        collect(PORT_RANGE, INUSE, sock=cast(socket.socket, Failing()))


# --- hand-built messages ---------------------------------------------------------------------


def message(
    state: int,
    family: int = socket.AF_INET,
    sport: int = 40000,
    dport: int = 80,
    source: str = "10.0.0.1",
    destination: str = "10.0.0.2",
    timer: int = 0,
    rqueue: int = 0,
    wqueue: int = 0,
    inode: int = 0,
    attributes: bytes = b"",
) -> bytes:
    """One SOCK_DIAG_BY_FAMILY answer: nlmsghdr + inet_diag_msg + attributes."""
    src = socket.inet_pton(family, source).ljust(16, b"\0")
    dst = socket.inet_pton(family, destination).ljust(16, b"\0")
    body = (
        struct.pack("=BBBB", family, state, timer, 0)
        + struct.pack("!HH", sport, dport)
        + src
        + dst
        + struct.pack("=I", 0)  # interface
        + struct.pack("=II", 0, 0)  # cookie
        + struct.pack("=IIIII", 0, rqueue, wqueue, 0, inode)  # expires, queues, uid, inode
        + attributes
    )
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


SHUTDOWN = struct.pack("=HHB3x", 5, INET_DIAG_SHUTDOWN, 0)
MARK = struct.pack("=HHI", 8, 15, 0)
DONE = struct.pack("=IHHIIi", 20, NLMSG_DONE, 2, 1, 0, 0)


def error_message(code: int) -> bytes:
    return struct.pack("=IHHIIi", 36, NLMSG_ERROR, 0, 1, 0, -code) + bytes(16)


def feed(
    data: bytes, family: str | None = "ipv4", aggregator: DumpAggregator | None = None
) -> bool:
    aggregator = aggregator or DumpAggregator(PORT_RANGE)
    return aggregator.feed(memoryview(data), len(data), family)


def test_hand_built_message_matches_the_recorded_layout() -> None:
    recorded = next(
        m
        for m in messages("mixed-ipv4-all.bin")
        if len(m) > 20 and m[17] == 6  # a TIME_WAIT socket: 88 bytes + MARK
    )
    built = message(6, sport=1, dport=5000, source="127.0.0.1", destination="127.0.0.1", timer=3)
    assert len(built) + len(MARK) == len(recorded) == 96


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (bytes(10), "truncated netlink header at byte 0 of 10"),
        (message(1, attributes=SHUTDOWN) + bytes(8), "truncated netlink header at byte 96 of 104"),
        (message(1)[:60], "bad netlink message length 88 at byte 0 of 60"),
        (
            struct.pack("=IHHII", 200, SOCK_DIAG_BY_FAMILY, 2, 1, 0) + bytes(100),
            "bad netlink message length 200 at byte 0 of 116",
        ),
        (
            struct.pack("=IHHII", 0, SOCK_DIAG_BY_FAMILY, 2, 1, 0),
            "bad netlink message length 0 at byte 0 of 16",
        ),
        (
            struct.pack("=IHHII", 8, SOCK_DIAG_BY_FAMILY, 2, 1, 0),
            "bad netlink message length 8 at byte 0 of 16",
        ),
        (
            struct.pack("=IHHII", 40, SOCK_DIAG_BY_FAMILY, 2, 1, 0) + bytes(24),
            "inet_diag message of 40 bytes at byte 0",
        ),
        (error_message(errno.EPERM), "kernel answered the dump with EPERM"),
        (message(1) + error_message(errno.EINVAL), "kernel answered the dump with EINVAL"),
        (message(13), "unknown TCP state 13 at byte 0"),
        (message(1) + message(0), "unknown TCP state 0 at byte 88"),
    ],
)
def test_malformed_input_raises(data: bytes, text: str) -> None:
    with pytest.raises(SockDiagError) as caught:
        feed(data)
    assert str(caught.value) == text


def test_done_ends_the_dump_mid_datagram() -> None:
    aggregator = DumpAggregator(PORT_RANGE)
    data = message(1, attributes=SHUTDOWN) + DONE + message(99)  # nothing after DONE is read
    assert feed(data, aggregator=aggregator)
    assert aggregator.messages == 1
    assert not feed(message(1, attributes=SHUTDOWN), aggregator=aggregator)


def test_done_carrying_an_error_fails_the_dump() -> None:
    # Seen on 6.18: a dump request for a protocol without an inet_diag handler is answered by
    # exactly this single message (nlmsg_len 20, NLMSG_DONE, NLM_F_MULTI, payload -ENOENT); it
    # must fail the dump rather than read as a namespace without sockets.
    failed_done = struct.pack("=IHHIIi", 20, NLMSG_DONE, 2, 1, 0, -errno.ENOENT)
    with pytest.raises(SockDiagError, match="ENOENT"):
        feed(failed_done)


def skmeminfo(drops: int, fields: int = 9) -> bytes:
    """INET_DIAG_SKMEMINFO: u32 sk_meminfo[fields], sk_drops at index 8."""
    values = [131072, 0, 16384, 0, 0, 0, 0, 0, drops][:fields]
    return struct.pack("=HH", 4 + 4 * fields, 7) + struct.pack(f"={fields}I", *values)


def test_listener_drops_come_from_skmeminfo() -> None:
    aggregator = DumpAggregator(PORT_RANGE)
    data = (
        message(10, sport=8080, dport=0, source="127.0.0.1", destination="0.0.0.0", wqueue=32,
                inode=11, attributes=SHUTDOWN + skmeminfo(10315))
        + message(10, sport=8081, dport=0, source="127.0.0.1", destination="0.0.0.0",
                  inode=12, attributes=SHUTDOWN)
        + message(10, sport=8082, dport=0, source="127.0.0.1", destination="0.0.0.0",
                  inode=13, attributes=skmeminfo(7, fields=8))
        + DONE
    )  # fmt: skip
    assert feed(data, aggregator=aggregator)
    drops = {lsn.port: lsn.drops for lsn in aggregator.result(None, True).listeners}
    # Without the attribute (or one too short to hold sk_drops) the count is unknown, not 0.
    assert drops == {8080: 10315, 8081: None, 8082: None}


def test_request_and_full_syn_recv_sockets_are_told_apart() -> None:
    aggregator = DumpAggregator(PORT_RANGE)
    listener = message(
        10,
        sport=443,
        source="0.0.0.0",
        destination="0.0.0.0",
        wqueue=128,
        inode=7,
        attributes=SHUTDOWN,
    )
    request_new = message(12, sport=443, dport=50000, timer=1, attributes=MARK)  # NEW_SYN_RECV
    request_old = message(3, sport=443, dport=50001, timer=1, attributes=MARK)
    full_syn_recv = message(3, sport=443, dport=50002, inode=9, attributes=MARK + SHUTDOWN)
    feed(listener + request_new + request_old + full_syn_recv, aggregator=aggregator)
    table = aggregator.result({"ipv4": 2, "ipv6": 0}, established_dumped=False)
    assert table.counts["ipv4"]["syn_recv"] == 3
    assert table.counts["ipv4"]["established"] == 0  # inuse 2 = listener + full SYN_RECV socket
    (only,) = table.listeners
    assert (only.address, only.port, only.queue_max, only.syn_recv, only.inode) == (
        "0.0.0.0",
        443,
        128,
        2,
        7,
    )


def test_request_sockets_prefer_the_exact_address_then_wildcard_then_dual_stack() -> None:
    aggregator = DumpAggregator(None)
    v6 = socket.AF_INET6
    listener = SHUTDOWN
    request = MARK
    feed(
        message(10, sport=80, source="10.0.0.1", destination="0.0.0.0", attributes=listener)
        + message(10, sport=81, source="0.0.0.0", destination="0.0.0.0", attributes=listener)
        + message(3, sport=80, source="10.0.0.1", attributes=request)
        + message(3, sport=81, source="10.0.0.9", attributes=request)
        # IPv4-family request sockets for IPv6 listeners (6.18 reports these as IPv6-family
        # sockets with mapped addresses, see test_listeners_queues_and_syn_queues; older
        # kernels may not): a [::] listener, and one bound to a v4-mapped address.
        + message(3, sport=82, source="10.0.0.9", attributes=request)
        + message(3, sport=84, source="10.0.0.9", attributes=request),
        aggregator=aggregator,
    )
    feed(
        message(10, family=v6, sport=82, source="::", destination="::", attributes=listener)
        + message(10, family=v6, sport=84, source="::", destination="::", attributes=listener)
        + message(
            10, family=v6, sport=84, source="::ffff:10.0.0.9", destination="::", attributes=listener
        )
        + message(3, family=v6, sport=82, source="::1", destination="::1", attributes=request)
        + message(
            3,
            family=v6,
            sport=84,
            source="::ffff:10.0.0.9",
            destination="::ffff:10.0.0.8",
            attributes=request,
        )
        + message(3, family=v6, sport=83, source="::1", destination="::1", attributes=request),
        family="ipv6",
        aggregator=aggregator,
    )
    table = aggregator.result(None, True)
    syn = {(item.address, item.port): item.syn_recv for item in table.listeners}
    # Port 83 has no listener: its request socket is counted in the states but owned by nobody.
    assert syn == {
        ("10.0.0.1", 80): 1,
        ("0.0.0.0", 81): 1,
        ("::", 82): 2,
        ("::", 84): 0,
        ("::ffff:10.0.0.9", 84): 2,
    }
    assert table.total("syn_recv") == 7


def test_timewait_sockets_are_not_full_sockets() -> None:
    aggregator = DumpAggregator(PORT_RANGE)
    feed(
        message(6, timer=3, attributes=MARK)  # TIME_WAIT
        + message(5, timer=3, dport=81, attributes=MARK)  # orphan FIN_WAIT2 (timewait socket)
        + message(5, dport=82, inode=5, attributes=SHUTDOWN)  # FIN_WAIT2 full socket
        + message(8, sport=22, dport=50000, inode=6, attributes=SHUTDOWN),  # CLOSE_WAIT
        aggregator=aggregator,
    )
    table = aggregator.result({"ipv4": 5, "ipv6": 0}, established_dumped=False)
    # inuse 5 - 2 full sockets seen = 3 inbound ESTABLISHED not dumped.
    assert table.counts["ipv4"]["established"] == 3
    assert table.counts["ipv4"]["fin_wait2"] == 2
    assert table.inodes_by_state == {"close_wait": frozenset({6})}
    assert [(use.port, use.sockets, use.time_wait) for use in table.ephemeral_use] == [
        (80, 1, 1),
        (81, 1, 0),
        (82, 1, 0),
    ]


# --- request building and the bytecode program --------------------------------------------------


def test_build_request_layout() -> None:
    request = build_request("ipv6", state_mask([1, 10]), sequence=7)
    assert len(request) == 16 + 56
    assert struct.unpack_from("=IHHII", request) == (
        72,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        7,
        0,
    )
    family, protocol, extensions, states = struct.unpack_from("=BBBxI", request, 16)
    assert (family, protocol, extensions) == (socket.AF_INET6, socket.IPPROTO_TCP, 0)
    assert states == (1 << 1) | (1 << 10)
    assert request[24:72] == bytes(48)  # inet_diag_sockid: match any


def test_build_request_for_both_families_layout() -> None:
    """struct inet_diag_req (TCPDIAG_GETSOCK): family AF_UNSPEC, ext, the 48-byte sockid,
    states, dbs; the kernel runs it for every family in one walk."""
    bytecode = port_range_bytecode(32768, 60999)
    request = build_request(None, ESTABLISHED_MASK, bytecode, sequence=4, extensions=2)
    assert struct.unpack_from("=IHHII", request) == (
        len(request),
        TCPDIAG_GETSOCK,
        NLM_F_REQUEST | NLM_F_DUMP,
        4,
        0,
    )
    assert struct.unpack_from("=BBBB", request, 16) == (socket.AF_UNSPEC, 0, 0, 2)
    assert request[20:68] == bytes(48)
    assert struct.unpack_from("=II", request, 68) == (ESTABLISHED_MASK, 0)
    assert struct.unpack_from("=HH", request, 76) == (20, INET_DIAG_REQ_BYTECODE)
    assert request[80:] == bytecode


def interleaved(names: Iterable[str]) -> bytes:
    """The messages of recordings, one of each in turn, as a walk of both families meets
    them; one DONE at the end."""
    queues = [[m for m in messages(name) if len(m) >= 88] for name in names]
    out: list[bytes] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return retyped(b"".join(out), TCPDIAG_GETSOCK) + DONE


def test_one_walk_of_both_families_parses_as_two_dumps() -> None:
    data = interleaved(["mixed-ipv4-all.bin", "mixed-ipv6-all.bin"])
    both = DumpAggregator(PORT_RANGE)
    assert both.feed(memoryview(data), len(data), None)
    assert both.result(None, True) == replay(FULL_DUMPS)
    counter = StateCounter()
    assert counter.feed(memoryview(data), len(data), None)
    table = replay(FULL_DUMPS)
    assert counter.messages == table.messages
    for family in ("ipv4", "ipv6"):
        assert {STATES[n - 1]: c for n, c in enumerate(counter.states[family]) if n and c} == {
            state: n for state, n in table.counts[family].items() if n
        }


def test_answers_of_the_other_request_type_are_refused() -> None:
    for family, data in (("ipv4", retyped(message(1), TCPDIAG_GETSOCK)), (None, message(1))):
        with pytest.raises(SockDiagError, match="unexpected netlink message type"):
            feed(data + DONE, family)
        with pytest.raises(SockDiagError, match="unexpected netlink message type"):
            StateCounter().feed(memoryview(data + DONE), len(data + DONE), family)


def test_a_message_of_another_family_than_asked_is_refused() -> None:
    data = message(1, family=socket.AF_INET6, source="::1", destination="::1") + DONE
    with pytest.raises(SockDiagError, match="unexpected address family 10"):
        feed(data, "ipv4")
    with pytest.raises(SockDiagError, match="unexpected address family 10"):
        StateCounter().feed(memoryview(data), len(data), "ipv4")
    odd = bytearray(retyped(message(1), TCPDIAG_GETSOCK))
    odd[16] = 7
    with pytest.raises(SockDiagError, match="unexpected address family 7"):
        feed(bytes(odd), None)


def test_build_request_with_bytecode() -> None:
    bytecode = port_range_bytecode(32768, 60999)
    request = build_request("ipv4", ESTABLISHED_MASK, bytecode, sequence=3)
    assert len(request) == 16 + 56 + 4 + 16
    assert struct.unpack_from("=I", request)[0] == len(request)
    assert request[16] == socket.AF_INET
    assert struct.unpack_from("=I", request, 20)[0] == 1 << 1
    assert struct.unpack_from("=HH", request, 72) == (20, INET_DIAG_REQ_BYTECODE)
    assert request[76:] == bytecode


def test_state_masks() -> None:
    assert state_mask([]) == 0
    assert state_mask([1, 6]) == 0b1000010
    assert ALL_STATES_MASK == state_mask(range(1, 13)) == 0x1FFE
    assert ALL_STATES_MASK & ESTABLISHED_MASK == ESTABLISHED_MASK


def test_port_range_bytecode_bytes() -> None:
    assert port_range_bytecode(32768, 60999) == (
        struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, 20)
        + struct.pack("=BBH", 0, 0, 32768)
        + struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, 12)
        + struct.pack("=BBH", 0, 0, 60999)
    )


def audit(program: bytes) -> None:
    """The kernel's checks (inet_diag_bc_audit) for programs of port comparisons."""
    offset, remaining = 0, len(program)
    while remaining > 0:
        code, yes, no = struct.unpack_from("=BBH", program, offset)
        assert code in (INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE)
        minimum = 8  # the op and its operand
        assert remaining >= minimum
        for jump in (yes, no):
            assert minimum <= jump <= remaining + 4 and jump % 4 == 0
        offset += yes
        remaining -= yes
    assert remaining == 0


def accepts(program: bytes, local_port: int) -> bool:
    """The kernel's interpreter (inet_diag_bc_run) for S_GE/S_LE: ending at the end accepts."""
    offset, remaining = 0, len(program)
    while remaining > 0:
        code, yes, no = struct.unpack_from("=BBH", program, offset)
        operand = struct.unpack_from("=BBH", program, offset + 4)[2]
        passed = local_port >= operand if code == INET_DIAG_BC_S_GE else local_port <= operand
        jump = yes if passed else no
        offset += jump
        remaining -= jump
    return remaining == 0


@pytest.mark.parametrize(
    ("low", "high"),
    [(32768, 60999), (1024, 1024), (0, 65535), (40000, 40100)],
)
def test_port_range_bytecode_jumps(low: int, high: int) -> None:
    program = port_range_bytecode(low, high)
    audit(program)
    for port in {0, low - 1, low, low + 1, high - 1, high, high + 1, 65535}:
        if 0 <= port <= 65535:
            assert accepts(program, port) == (low <= port <= high), port
