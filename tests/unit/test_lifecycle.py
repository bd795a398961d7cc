"""Destroy events and tcp_info: hand-built binary messages in the kernel's layout (6.18 offsets).

The layouts were checked against real messages (tests/integration/test_lifecycle_netns.py runs
the same code against the kernel beside ``ss -tinE``); here every branch is driven by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import random
import socket
import struct
from typing import cast

import pytest

from tcpwatch.model import (
    OUTCOMES,
    PEER_OTHER,
    RTT_BUCKETS_SECONDS,
    DestinationUse,
    LifecycleStats,
    PeerStats,
)
from tcpwatch.sources import tcpinfo
from tcpwatch.sources.lifecycle import DESTROY_GROUPS, DestroyListener
from tcpwatch.sources.lifecycle_events import (
    Classification,
    classify,
    make_context,
    parse_destroy_messages,
)
from tcpwatch.sources.lifecycle_peers import FAILURE_WEIGHT, LifecycleAggregator, table_of
from tcpwatch.sources.netlink import (
    INET_DIAG_INFO,
    INET_DIAG_PROTOCOL,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    SockDiagError,
)
from tcpwatch.sources.recvbatch import BatchReceiver, RecvMmsg, libc_recvmmsg
from tcpwatch.sources.sockdiag import DumpAggregator
from tcpwatch.sources.tcpinfo import FULL_LENGTH, TcpInfo, parse_tcp_info
from tcpwatch.stalls import ClosedWaits
from tcpwatch.tracepoint_stats import ClearedClose

CONTEXT = make_context({8080}, (32768, 60999), [("0.0.0.0", 8080), ("::", 8443)])
FIELD_CODES = {name: (offset, code) for name, offset, code in tcpinfo._FIELDS}


def info_bytes(length: int = FULL_LENGTH, **values: int) -> bytes:
    """A struct tcp_info of ``length`` bytes with the named fields set (the rest zero)."""
    data = bytearray(max(length, FULL_LENGTH))
    for name, value in values.items():
        offset, code = FIELD_CODES[name]
        struct.pack_into("=" + code, data, offset, value)
    return bytes(data[:length])


def attribute(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def destroy_message(
    source: str = "127.0.0.1",
    sport: int = 40000,
    destination: str = "127.0.0.1",
    dport: int = 5432,
    info: bytes | None = None,
    protocol: int | None = 6,
    cookie: int = 7,
    family: int | None = None,
) -> bytes:
    """nlmsghdr + inet_diag_msg (state TCP_CLOSE) + INET_DIAG_INFO + INET_DIAG_PROTOCOL."""
    family = family or (socket.AF_INET6 if ":" in destination else socket.AF_INET)
    src = socket.inet_pton(family, source).ljust(16, b"\0")
    dst = socket.inet_pton(family, destination).ljust(16, b"\0")
    body = (
        struct.pack("=BBBB", family, 7, 0, 0)
        + struct.pack("!HH", sport, dport)
        + src
        + dst
        + struct.pack("=I", 0)
        + struct.pack("=Q", cookie)
        + struct.pack("=IIIII", 0, 0, 0, 0, 0)
    )
    if info is not None:
        body += attribute(INET_DIAG_INFO, info)
    if protocol is not None:
        body += attribute(INET_DIAG_PROTOCOL, bytes([protocol]))
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 0, 0, 0) + body


OK_INFO = info_bytes(
    rtt=150, total_retrans=2, bytes_acked=1001, bytes_received=501, segs_out=6, segs_in=4,
    delivered=3,
)  # fmt: skip
TIMEOUT_INFO = info_bytes(total_retrans=2, segs_out=3, segs_in=0)
REFUSED_INFO = info_bytes(segs_out=1, segs_in=1)
CLEARED_INFO = info_bytes()
# After tcp_disconnect (6.18): a failed connect never had an RTT sample (min_rtt ~0U) nor a
# window from the peer; one that had worked keeps both.
NEVER_INFO = info_bytes(min_rtt=0xFFFFFFFF, snd_mss=524, rto=1000000)
WORKED_INFO = info_bytes(min_rtt=10, snd_wnd=65536, snd_mss=32768)


# --- tcp_info ------------------------------------------------------------------------------


def test_full_tcp_info_fields_at_their_offsets() -> None:
    data = bytearray(info_bytes(rtt=1234, total_retrans=5, bytes_acked=1 << 40, delivered=9))
    data[6] = 0x97  # snd_wscale 7 (low nibble), rcv_wscale 9
    data[0] = 7
    info = parse_tcp_info(bytes(data))
    assert info.length == 280
    assert (info.state, info.snd_wscale, info.rcv_wscale) == (7, 7, 9)
    assert (info.rtt, info.total_retrans, info.bytes_acked, info.delivered) == (1234, 5, 1 << 40, 9)
    assert info.total_rto_time == 0  # the last parsed field is present


@pytest.mark.parametrize(
    ("length", "last_present", "first_absent"),
    [
        (104, "total_retrans", "pacing_rate"),
        (144, "segs_in", "notsent_bytes"),
        (196, "delivered", "delivered_ce"),
        (232, "snd_wnd", "rcv_wnd"),
        (250, "total_rto_time", None),
    ],
)
def test_short_tcp_info_leaves_missing_fields_none(
    length: int, last_present: str, first_absent: str | None
) -> None:
    info = parse_tcp_info(info_bytes(length, **{last_present: 77}))
    assert getattr(info, last_present) == 77
    if first_absent is not None:
        assert getattr(info, first_absent) is None
        assert info.total_rto_time is None


def test_empty_and_tiny_tcp_info() -> None:
    assert parse_tcp_info(b"") == TcpInfo(length=0)
    assert parse_tcp_info(b"\x01\x02").ca_state == 2
    assert parse_tcp_info(b"\x01\x02").retransmits is None


# --- parsing destroy messages --------------------------------------------------------------


def test_ipv4_and_ipv6_events_parse() -> None:
    data = destroy_message(sport=40001, info=OK_INFO) + destroy_message(
        "::1", 8443, "::1", 50000, info=info_bytes(168, rtt=10)
    )
    first, second = parse_destroy_messages(data)
    assert (first.family, first.source, first.source_port) == ("ipv4", "127.0.0.1", 40001)
    assert (first.destination, first.destination_port, first.state) == ("127.0.0.1", 5432, 7)
    assert (first.protocol, first.cookie, first.cleared) == (6, 7, False)
    assert first.info is not None and first.info.bytes_acked == 1001
    assert (second.family, second.source, second.destination_port) == ("ipv6", "::1", 50000)
    assert second.info is not None and second.info.length == 168 and second.info.delivered is None


def test_event_without_attributes() -> None:
    (event,) = parse_destroy_messages(destroy_message(info=None, protocol=None))
    assert event.info is None and event.protocol is None


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (bytes(10), "truncated netlink header at byte 0 of 10"),
        (destroy_message(info=OK_INFO)[:100], "bad netlink message length"),
        (struct.pack("=IHHII", 40, SOCK_DIAG_BY_FAMILY, 0, 0, 0) + bytes(24), "of 40 bytes"),
        (struct.pack("=IHHII", 0, SOCK_DIAG_BY_FAMILY, 0, 0, 0), "bad netlink message length 0"),
        (struct.pack("=IHHIIi", 20, NLMSG_ERROR, 0, 0, 0, -1), "netlink error message"),
        (struct.pack("=IHHII", 16, 99, 0, 0, 0), "unexpected netlink message type 99"),
        (bytes([88, 0, 0, 0, 20, 0]) + bytes(10) + bytes([99]) + bytes(71), "address family 99"),
    ],
)
def test_garbage_raises_the_parse_error(data: bytes, text: str) -> None:
    with pytest.raises(SockDiagError, match=text):
        list(parse_destroy_messages(data))
    with pytest.raises(SockDiagError, match=text):
        LifecycleAggregator().feed(data, len(data))


def test_done_and_noop_messages_are_skipped() -> None:
    done = struct.pack("=IHHIIi", 20, NLMSG_DONE, 0, 0, 0, 0)
    data = done + destroy_message(info=OK_INFO) + struct.pack("=IHHII", 16, 1, 0, 0, 0)
    assert len(list(parse_destroy_messages(data))) == 1


def test_attribute_running_past_its_message_is_ignored() -> None:
    message = bytearray(destroy_message(info=OK_INFO))
    struct.pack_into("=H", message, 88, 4000)  # INET_DIAG_INFO claims 4000 bytes
    (event,) = parse_destroy_messages(bytes(message))
    assert event.info is None


@pytest.mark.parametrize("seed", range(300))
def test_random_and_mutated_input_only_ever_raises_the_parse_error(seed: int) -> None:
    rng = random.Random(seed)
    if seed % 2:
        data = bytearray(destroy_message(info=OK_INFO) * 2)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))]
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 600)))
    aggregator = LifecycleAggregator()
    for attempt in (lambda: list(parse_destroy_messages(bytes(data))),
                    lambda: aggregator.feed(memoryview(data), len(data))):  # fmt: skip
        with contextlib.suppress(SockDiagError):
            attempt()


# --- classification ------------------------------------------------------------------------


def one(data: bytes) -> Classification | None:
    (event,) = parse_destroy_messages(data)
    return classify(event, CONTEXT)


OUT, IN = "outbound", "inbound"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (destroy_message(info=OK_INFO), (OUT, "127.0.0.1:5432", "ok")),
        (destroy_message(info=TIMEOUT_INFO), (OUT, "127.0.0.1:5432", "timeout")),
        (destroy_message(info=REFUSED_INFO), (OUT, "127.0.0.1:5432", "refused")),
        # blocking connect() failure / SO_LINGER 0: port and source address cleared
        (
            destroy_message("0.0.0.0", 40000, "10.1.2.3", 0, CLEARED_INFO),
            (OUT, "10.1.2.3", "aborted"),
        ),
        (
            destroy_message("::", 40000, "2001:db8::5", 0, CLEARED_INFO),
            (OUT, "2001:db8::5", "aborted"),
        ),
        (
            destroy_message("::", 40000, "2001:db8::5", 443, OK_INFO),
            (OUT, "[2001:db8::5]:443", "ok"),
        ),
        # inbound: the listener's port, named as the (wildcard) listener
        (destroy_message("10.0.0.1", 8080, "10.0.0.9", 50000, OK_INFO), (IN, "0.0.0.0:8080", "ok")),
        (destroy_message("::1", 8443, "::1", 50000, OK_INFO), (IN, "[::]:8443", "ok")),
        (
            destroy_message("::ffff:10.0.0.1", 8443, "::ffff:10.0.0.9", 50000, OK_INFO),
            (IN, "[::]:8443", "ok"),
        ),
        (
            destroy_message("0.0.0.0", 8080, "10.0.0.9", 0, CLEARED_INFO),
            (IN, "0.0.0.0:8080", "aborted"),
        ),
        # a port outside the ephemeral range without a known listener: inbound, local address
        (destroy_message("10.0.0.1", 22, "10.0.0.9", 50000, OK_INFO), (IN, "10.0.0.1:22", "ok")),
        (destroy_message("0.0.0.0", 22, "10.0.0.9", 0, CLEARED_INFO), (IN, "*:22", "aborted")),
        # cleared, but the handshake had completed (an RTT sample, the peer's window survive):
        # a working connection cut with SO_LINGER 0, not a failed connect
        (destroy_message("0.0.0.0", 40000, "10.1.2.3", 0, WORKED_INFO), (OUT, "10.1.2.3", "ok")),
        (
            destroy_message("0.0.0.0", 40000, "10.1.2.3", 0, NEVER_INFO),
            (OUT, "10.1.2.3", "aborted"),
        ),
        (destroy_message("0.0.0.0", 8080, "10.0.0.9", 0, WORKED_INFO), (IN, "0.0.0.0:8080", "ok")),
    ],
)
def test_classification(message: bytes, expected: tuple[str, str, str]) -> None:
    assert one(message) == Classification(*expected)


@pytest.mark.parametrize(
    ("info", "outcome"),
    [
        (WORKED_INFO, "ok"),
        (NEVER_INFO, "aborted"),
        (info_bytes(200, min_rtt=25), "ok"),  # before snd_wnd (5.4): the RTT sample tells
        (info_bytes(200, min_rtt=0xFFFFFFFF), "aborted"),
        (info_bytes(144), "aborted"),  # before min_rtt: nothing tells, so a failed connect
    ],
)
def test_cleared_events_are_told_apart_by_what_survives(info: bytes, outcome: str) -> None:
    data = destroy_message("0.0.0.0", 40000, "10.1.2.3", 0, info)
    classified = one(data)
    assert classified == Classification(OUT, "10.1.2.3", outcome)
    aggregator = LifecycleAggregator()  # the hot path agrees with classify()
    aggregator.feed(data, len(data))
    (row,) = stats(aggregator).peers
    assert row.closed[outcome] == 1 and sum(row.closed.values()) == 1


def test_a_failed_connect_whose_port_was_cleared_is_kept_by_its_local_port() -> None:
    """For the join with the tracepoints (tcpwatch/peer_join.py): family, local port, address;
    a connection that worked and was cut the same way is not a failed connect."""
    aggregator = LifecycleAggregator()
    feed(
        aggregator,
        destroy_message("0.0.0.0", 53320, "127.0.0.1", 0, NEVER_INFO),
        destroy_message("0.0.0.0", 53320, "127.0.0.1", 0, NEVER_INFO),
        destroy_message("0.0.0.0", 53321, "127.0.0.1", 0, NEVER_INFO),
        destroy_message("0.0.0.0", 53322, "127.0.0.1", 0, WORKED_INFO),
    )
    drained = aggregator.stats(overruns=0, lost=0, receive_buffer=0)
    assert sorted(drained.cleared, key=lambda c: c.local_port) == [
        ClearedClose(socket.AF_INET, 53320, "127.0.0.1", 2),
        ClearedClose(socket.AF_INET, 53321, "127.0.0.1", 1),
    ]
    deltas = [a.delta for a in drained.activity or () if a.delta is not None]
    assert [(d.peer, d.closed["ok"], d.closed["aborted"]) for d in deltas] == [("127.0.0.1", 1, 0)]
    assert (
        aggregator.stats(overruns=0, lost=0, receive_buffer=0).cleared == ()
    )  # each drain holds what came since the previous


def test_uid_and_inode_are_read_at_their_offsets() -> None:
    data = bytearray(destroy_message(info=OK_INFO))
    struct.pack_into("=IIIII", data, 68, 1, 2, 3, 1001, 4242)  # expires, rqueue, wqueue, uid, ino
    (event,) = parse_destroy_messages(bytes(data))
    assert (event.uid, event.inode, event.cookie) == (1001, 4242, 7)


def test_listener_inside_the_ephemeral_range_is_inbound() -> None:
    context = make_context({40000}, (32768, 60999), [("127.0.0.1", 40000)])
    (event,) = parse_destroy_messages(destroy_message(info=OK_INFO))
    assert classify(event, context) == Classification("inbound", "127.0.0.1:40000", "ok")


def test_sockets_that_never_had_a_peer_are_not_classified() -> None:
    closed_listener = destroy_message("0.0.0.0", 8080, "0.0.0.0", 0, CLEARED_INFO)
    never_connected = destroy_message("0.0.0.0", 0, "0.0.0.0", 0, CLEARED_INFO)
    assert one(closed_listener) is None and one(never_connected) is None
    assert one(destroy_message(info=None)) is None


@pytest.mark.parametrize(
    ("info", "outcome"),
    [
        (info_bytes(136, bytes_acked=1, bytes_received=1), "ok"),
        (info_bytes(144, segs_in=1), "refused"),
        (info_bytes(144, segs_in=0, total_retrans=3), "timeout"),
        (info_bytes(104, options=7), "ok"),
        (info_bytes(104), "timeout"),
    ],
)
def test_older_kernels_short_tcp_info(info: bytes, outcome: str) -> None:
    classified = one(destroy_message(info=info))
    assert classified is not None and classified.outcome == outcome
    aggregator = LifecycleAggregator()
    aggregator.feed(destroy_message(info=info), len(destroy_message(info=info)))
    (row,) = stats(aggregator).peers
    assert row.closed[outcome] == 1


# --- aggregation ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(aggregator: LifecycleAggregator) -> LifecycleStats:
    return table_of(aggregator.stats(overruns=0, lost=0, receive_buffer=0))


def rows(aggregator: LifecycleAggregator) -> dict[tuple[str, str], PeerStats]:
    """What closed since the previous drain, per tracked peer (every peer its own row)."""
    result = table_of(aggregator.stats(overruns=0, lost=0, receive_buffer=0))
    return {(row.direction, row.peer): row for row in result.peers}


def feed(aggregator: LifecycleAggregator, *messages: bytes) -> None:
    for message in messages:
        aggregator.feed(memoryview(message), len(message))


def test_aggregation_agrees_with_classify_and_sums_the_counters() -> None:
    messages = [
        destroy_message(sport=40000 + n, info=OK_INFO if n % 3 else TIMEOUT_INFO) for n in range(9)
    ] + [
        destroy_message("10.0.0.1", 8080, "10.0.0.9", 50000 + n, OK_INFO) for n in range(4)
    ] + [destroy_message("0.0.0.0", 40100, "127.0.0.1", 0, CLEARED_INFO),
         destroy_message("0.0.0.0", 8080, "0.0.0.0", 0, CLEARED_INFO)]  # fmt: skip
    aggregator = LifecycleAggregator()
    aggregator.update_context(CONTEXT)
    feed(aggregator, b"".join(messages[:5]), *messages[5:])  # several messages in one datagram
    expected: dict[tuple[str, str], dict[str, int]] = {}
    for message in messages:
        classified = one(message)
        if classified is not None:
            counts = expected.setdefault((classified.direction, classified.peer), {})
            counts[classified.outcome] = counts.get(classified.outcome, 0) + 1
    got = rows(aggregator)
    assert {key: {k: v for k, v in row.closed.items() if v} for key, row in got.items()} == expected
    outbound = got[("outbound", "127.0.0.1:5432")]
    assert outbound.closed == {"ok": 6, "timeout": 3, "refused": 0, "aborted": 0}
    assert outbound.segments_sent == 6 * 6 + 3 * 3
    assert outbound.segments_retransmitted == 6 * 2 + 3 * 2
    assert (outbound.bytes_sent, outbound.bytes_received) == (6 * 1001, 6 * 501)
    assert outbound.rtt_count == 6 and outbound.rtt_sum_seconds == pytest.approx(6 * 150e-6)
    result = aggregator.stats(overruns=2, lost=3, receive_buffer=4)
    assert (result.events, result.ignored, result.malformed, result.overruns) == (15, 1, 0, 2)
    assert (result.lost, result.receive_buffer, result.evicted) == (3, 4, 0)


# A sender that spent 5 s busy, 4 s of it on the peer's window and 0.25 s on its send buffer.
WAITED = {"busy_time": 5_000_000, "rwnd_limited": 4_000_000, "sndbuf_limited": 250_000}


@pytest.mark.parametrize(
    ("info", "waits"),
    [
        # the peer's window was shut when it ended: a zero-window close
        (
            info_bytes(**WAITED, delivered=9, snd_wnd=0),
            ClosedWaits(5_000_000, 4_000_000, 250_000, 1),
        ),
        (
            info_bytes(**WAITED, delivered=9, snd_wnd=65536),
            ClosedWaits(5_000_000, 4_000_000, 250_000, 0),
        ),
        # 4.18 to 5.3 (no snd_wnd): the times, never a guessed zero window
        (info_bytes(200, **WAITED, delivered=9), ClosedWaits(5_000_000, 4_000_000, 250_000, 0)),
        # 4.10 (the chronographs, no tcpi_delivered): the slow path reads the same
        (info_bytes(192, **WAITED, bytes_acked=1), ClosedWaits(5_000_000, 4_000_000, 250_000, 0)),
        (info_bytes(168, bytes_acked=1), ClosedWaits()),  # before 4.10: nothing to add
        # a connect that failed never had a window from its peer: no zero-window close
        (info_bytes(segs_out=3, snd_wnd=0), ClosedWaits()),
        # never held back by the peer: a zero window at the end says nothing of it
        (info_bytes(busy_time=9, delivered=9, snd_wnd=0), ClosedWaits(9, 0, 0, 0)),
    ],
)
def test_closed_connections_add_where_their_time_went(info: bytes, waits: ClosedWaits) -> None:
    aggregator = LifecycleAggregator()
    feed(aggregator, destroy_message(info=info))
    (row,) = rows(aggregator).values()
    assert row.waits == waits


def test_info_is_found_whatever_attribute_comes_first() -> None:
    """The reader looks for INET_DIAG_INFO where the previous message had it (6.18: after
    PROTOCOL) and walks the attributes when it is not there: mixed layouts all count."""
    info = info_bytes(**WAITED, delivered=9, snd_wnd=0)
    first = destroy_message(info=info)  # INFO, then PROTOCOL
    body = destroy_message(info=None) + attribute(INET_DIAG_INFO, info)  # PROTOCOL, then INFO
    second = struct.pack("=I", len(body)) + body[4:]
    bare = destroy_message(info=None)  # no INFO at all: ignored
    aggregator = LifecycleAggregator()
    feed(aggregator, first + second + second + bare + first + second)
    (row,) = rows(aggregator).values()
    assert sum(row.closed.values()) == 5 and row.waits == ClosedWaits(
        5 * 5_000_000, 5 * 4_000_000, 5 * 250_000, 5
    )
    assert aggregator.ignored == 1


def test_waits_sum_per_peer_and_fold_into_other_with_the_closes() -> None:
    aggregator = LifecycleAggregator(max_peers=2, peer_idle_seconds=600, clock=Clock())
    zero = info_bytes(**WAITED, delivered=9, snd_wnd=0)
    feed(aggregator, *[destroy_message(dport=1001, info=zero)] * 3)
    feed(aggregator, destroy_message(dport=1002, info=zero))
    feed(aggregator, destroy_message(dport=1003, info=zero))  # full: 1002 is folded
    got = rows(aggregator)
    assert got[("outbound", "127.0.0.1:1001")].waits == ClosedWaits(
        15_000_000, 12_000_000, 750_000, 3
    )
    assert got[("outbound", PEER_OTHER)].waits == ClosedWaits(5_000_000, 4_000_000, 250_000, 1)
    total = sum((row.waits for row in got.values()), ClosedWaits())
    assert total == ClosedWaits(25_000_000, 20_000_000, 1_250_000, 5)  # none lost


@pytest.mark.parametrize(
    ("rtt_us", "bucket"),
    [
        (1, 0),
        (10, 0),
        (11, 1),
        (100, 2),
        (1000, 4),
        (999_999, 10),
        (1_000_000, 10),
        (1_000_001, 11),
    ],
)
def test_rtt_buckets_are_upper_bounds(rtt_us: int, bucket: int) -> None:
    aggregator = LifecycleAggregator()
    feed(aggregator, destroy_message(info=info_bytes(rtt=rtt_us, delivered=1)))
    (row,) = rows(aggregator).values()
    assert len(row.rtt_buckets) == len(RTT_BUCKETS_SECONDS) + 1
    assert row.rtt_buckets[bucket] == 1 and sum(row.rtt_buckets) == 1
    assert row.rtt_cumulative()[-1] == 1 and row.rtt_cumulative()[bucket] == 1


def test_tracker_is_bounded_keeps_the_busy_and_conserves_every_close() -> None:
    clock = Clock()
    aggregator = LifecycleAggregator(max_peers=4, peer_idle_seconds=600, clock=clock)
    for _ in range(5):
        feed(aggregator, destroy_message(dport=1001, info=OK_INFO))
    for port in (1002, 1003, 1004, 1005):  # 1005 finds the tracker full: the quieter half goes
        feed(aggregator, destroy_message(dport=port, info=OK_INFO))
    result = aggregator.stats(0, 0, 0)
    got = {(a.direction, a.peer): a for a in result.activity or ()}
    assert ("outbound", "127.0.0.1:1001") in got and ("outbound", "127.0.0.1:1005") in got
    assert len(got) == 4  # 1001, one of the quiet ones, 1005, and other
    closed = {key: sum(a.delta.closed.values()) for key, a in got.items() if a.delta}
    assert closed[("outbound", "127.0.0.1:1001")] == 5
    assert closed[("outbound", PEER_OTHER)] == 2  # the two dropped, folded, none lost
    assert sum(closed.values()) == 9
    assert result.evicted == 2
    assert got[("outbound", "127.0.0.1:1001")].score == 5
    # a drain resets the counts; a pair with nothing new is listed as before (the drain does
    # no work for it), its score halving per minute from its last close on
    clock.now += 60
    again = {(a.direction, a.peer): a for a in aggregator.stats(0, 0, 0).activity or ()}
    assert again[("outbound", "127.0.0.1:1001")].delta is None
    assert again[("outbound", "127.0.0.1:1001")].score == 5
    assert ("outbound", PEER_OTHER) not in again  # nothing new folded
    feed(aggregator, destroy_message(dport=1001, info=OK_INFO))
    again = {(a.direction, a.peer): a for a in aggregator.stats(0, 0, 0).activity or ()}
    assert again[("outbound", "127.0.0.1:1001")].score == pytest.approx(5 / 2 + 1)
    # a new busy peer is tracked and outscores the old quiet ones
    for _ in range(20):
        feed(aggregator, destroy_message(dport=2000, info=OK_INFO))
    clock.now += 1
    scores = {a.peer: a.score for a in aggregator.stats(0, 0, 0).activity or ()}
    assert scores["127.0.0.1:2000"] > scores["127.0.0.1:1001"]
    # nothing for the idle time: every pair is dropped
    clock.now += 600
    assert not aggregator.stats(0, 0, 0).activity


def test_a_drain_works_only_on_the_pairs_that_changed() -> None:
    """200 tracked pairs, one close since the last drain: the other 199 are listed as the
    previous drain listed them (the same objects, no new work), the one with its delta."""
    clock = Clock()
    aggregator = LifecycleAggregator(max_peers=256, peer_idle_seconds=600, clock=clock)
    for port in range(1000, 1200):
        feed(aggregator, destroy_message(dport=port, info=OK_INFO))
    aggregator.stats(0, 0, 0)  # every pair changed: each has its delta
    clock.now += 1
    first = {a.peer: a for a in aggregator.stats(0, 0, 0).activity or ()}  # none changed
    clock.now += 1
    feed(aggregator, destroy_message(dport=1007, info=TIMEOUT_INFO))
    second = {a.peer: a for a in aggregator.stats(0, 0, 0).activity or ()}
    assert first.keys() == second.keys() and len(second) == 200
    changed = [peer for peer, a in second.items() if a is not first[peer]]
    assert changed == ["127.0.0.1:1007"]
    delta = second["127.0.0.1:1007"].delta
    assert delta is not None and delta.closed["timeout"] == 1 and sum(delta.closed.values()) == 1
    assert all(a.delta is None for peer, a in second.items() if peer != "127.0.0.1:1007")


def test_a_destination_that_fails_keeps_its_place_beside_busier_healthy_ones() -> None:
    """Rows go to the busiest peers, but a failure weighs FAILURE_WEIGHT closes: a dead backend
    tried 3 times is tracked (and so judged by name) while healthy peers with 10 closes each
    fill the tracker and its quieter half is dropped."""
    aggregator = LifecycleAggregator(max_peers=8, peer_idle_seconds=600, clock=Clock())
    for _ in range(3):
        feed(aggregator, destroy_message(dport=9999, info=REFUSED_INFO))
    for port in range(2000, 2012):  # more healthy peers than the tracker holds
        for _ in range(10):
            feed(aggregator, destroy_message(dport=port, info=OK_INFO))
    got = {a.peer: a for a in aggregator.stats(0, 0, 0).activity or ()}
    assert "127.0.0.1:9999" in got, sorted(got)
    assert got["127.0.0.1:9999"].score == 3 * FAILURE_WEIGHT
    assert got["127.0.0.1:9999"].delta is not None
    assert got["127.0.0.1:9999"].delta.closed["refused"] == 3


def test_context_change_renames_new_events_only() -> None:
    aggregator = LifecycleAggregator()
    inbound = destroy_message("10.0.0.1", 9000, "10.0.0.9", 50000, OK_INFO)
    feed(aggregator, inbound)
    aggregator.update_context(make_context({9000}, None, [("0.0.0.0", 9000)]))
    feed(aggregator, inbound)
    assert {key: row.closed["ok"] for key, row in rows(aggregator).items()} == {
        ("inbound", "10.0.0.1:9000"): 1,
        ("inbound", "0.0.0.0:9000"): 1,
    }


# --- the listener, over a socket pair standing in for netlink -------------------------------


def test_listener_reads_every_pending_datagram_and_counts_garbage() -> None:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    with writer:
        listener = DestroyListener(sock=reader)
        listener.update_context(frozenset({8080}), (32768, 60999), [("0.0.0.0", 8080)])
        for n in range(50):
            writer.send(destroy_message(sport=40000 + n, info=OK_INFO))
        writer.send(b"garbage!")
        writer.send(destroy_message("10.0.0.1", 8080, "10.0.0.9", 50000, OK_INFO))
        assert listener.fileno() == reader.fileno()
        listener.read_ready()
        result = table_of(listener.drain())
        listener.close()
        listener.close()
    assert (result.events, result.malformed, result.overruns, result.lost) == (51, 1, 0, 0)
    got = {(row.direction, row.peer): row.closed["ok"] for row in result.peers}
    assert got == {("outbound", "127.0.0.1:5432"): 50, ("inbound", "0.0.0.0:8080"): 1}
    assert result.receive_buffer > 0


class FakeSocket:
    """Stands in for the netlink socket where only its options matter (the reads go through the
    listener's receiver)."""

    def getsockopt(self, level: int, option: int, size: int = 0) -> int | bytes:
        if size:
            raise OSError(errno.ENOPROTOOPT, "no SO_MEMINFO")
        return 1234

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass


def failing_then(real: RecvMmsg, errors: list[int]) -> RecvMmsg:
    """recvmmsg that fails with each of ``errors`` in turn (ctypes' errno), then is ``real``."""

    def call(fd: int, headers: object, slots: int, flags: int, timeout: object) -> int:
        if errors:
            ctypes.set_errno(errors.pop(0))
            return -1
        return real(fd, headers, slots, flags, timeout)

    return call


def test_enobufs_counts_an_overrun_and_reading_continues() -> None:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with reader, writer:
        writer.send(destroy_message(info=OK_INFO))
        receiver = BatchReceiver(
            reader.fileno(), call=failing_then(libc_recvmmsg(), [errno.ENOBUFS])
        )
        listener = DestroyListener(sock=cast(socket.socket, FakeSocket()), receiver=receiver)
        listener.read_ready()
        result = listener.drain()
    assert (result.overruns, result.events, result.lost, result.receive_buffer) == (
        1,
        1,
        None,
        1234,
    )


def test_other_socket_errors_raise_the_parse_error() -> None:
    receiver = BatchReceiver(99, call=failing_then(libc_recvmmsg(), [errno.EBADF]))
    listener = DestroyListener(sock=cast(socket.socket, FakeSocket()), receiver=receiver)
    with pytest.raises(SockDiagError, match="reading TCP destroy events failed"):
        listener.read_ready()


def test_group_bitmask() -> None:
    assert DESTROY_GROUPS == 0b101  # groups 1 (IPv4 TCP) and 3 (IPv6 TCP)
    assert OUTCOMES == ("ok", "timeout", "refused", "aborted")


# --- live connections on the per-destination dump -------------------------------------------


def dump_message(sport: int, dport: int, info: bytes | None) -> bytes:
    """An ESTABLISHED answer of the per-destination dump (state 1) with INET_DIAG_INFO."""
    message = bytearray(destroy_message(sport=sport, dport=dport, info=info, protocol=None))
    message[17] = 1
    return bytes(message)


def test_destination_scan_aggregates_live_rtt_and_retransmissions() -> None:
    aggregator = DumpAggregator((32768, 60999))
    aggregator.read_info = True
    data = b"".join(
        [
            dump_message(40001, 5432, info_bytes(rtt=100, retrans=1, total_retrans=4, segs_out=50)),
            dump_message(40002, 5432, info_bytes(rtt=300, retrans=0, total_retrans=1, segs_out=30)),
            dump_message(40003, 5432, info_bytes(rtt=0, segs_out=2)),  # no RTT sample yet
            dump_message(40004, 5432, info_bytes(104, rtt=200, total_retrans=2)),  # < 4.2
            dump_message(40005, 6379, None),  # no tcp_info: counted, no live fields
        ]
    )
    aggregator.feed(memoryview(data), len(data), "ipv4")
    table = aggregator.result({"ipv4": 5, "ipv6": 0}, established_dumped=False)
    by_port = {use.port: use for use in table.ephemeral_use}
    assert by_port[5432].rtt_mean_seconds == pytest.approx(200e-6)
    assert by_port[5432] == DestinationUse(
        "ipv4", "127.0.0.1", "127.0.0.1", 5432, 4, 0,
        established=4, rtt_connections=3, rtt_mean_seconds=by_port[5432].rtt_mean_seconds,
        rtt_max_seconds=300e-6, retransmits_in_flight=1, segments_retransmitted=7,
        segments_sent=82, stalls=by_port[5432].stalls,
    )  # fmt: skip
    # One connection's tcp_info stops at total_retrans (< 4.2): the limited times are unknown
    # rather than 0, and no SKMEMINFO came, so no drops either (tests/unit/test_liveinfo.py).
    stalls = by_port[5432].stalls
    assert stalls is not None
    assert (stalls.connections, stalls.busy_seconds, stalls.drops) == (4, None, None)
    assert by_port[6379] == DestinationUse("ipv4", "127.0.0.1", "127.0.0.1", 6379, 1, 0)


def test_read_delay_follows_the_buffer() -> None:
    class Buffer(FakeSocket):
        def __init__(self, size: int) -> None:
            self.size = size

        def getsockopt(self, level: int, option: int, size: int = 0) -> int | bytes:
            return self.size

    assert DestroyListener(sock=cast(socket.socket, Buffer(8 << 20))).read_delay == 0.02
    small = DestroyListener(sock=cast(socket.socket, Buffer(425_984))).read_delay
    assert 0.003 < small < 0.005


def test_destination_scan_finds_tcp_info_wherever_it_is() -> None:
    """Same message length, INFO at another place: the remembered position must not misread."""
    shutdown = struct.pack("=HHB3x", 5, 8, 0)
    info = info_bytes(rtt=100, total_retrans=1, segs_out=10)
    first = bytearray(destroy_message(sport=40001, info=None, protocol=None))
    first += shutdown + attribute(INET_DIAG_INFO, info)
    second = bytearray(destroy_message(sport=40002, info=None, protocol=None))
    second += attribute(INET_DIAG_INFO, info_bytes(rtt=300, total_retrans=2, segs_out=20))
    second += shutdown
    for message in (first, second):
        message[17] = 1  # ESTABLISHED
        struct.pack_into("=I", message, 0, len(message))
    assert len(first) == len(second)
    aggregator = DumpAggregator((32768, 60999))
    aggregator.read_info = True
    data = bytes(first + second + first)
    aggregator.feed(memoryview(data), len(data), "ipv4")
    (use,) = aggregator.result({"ipv4": 3, "ipv6": 0}, established_dumped=False).ephemeral_use
    assert (use.established, use.rtt_max_seconds) == (3, 300e-6)
    assert (use.segments_retransmitted, use.segments_sent) == (4, 40)
