"""tracefs format files (this kernel's, copied to tests/fixtures/tracefs), the events and filters
the tracepoints source derives from them, and the layouts of older kernels."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tcpwatch.sources import tracepoints_events as events
from tcpwatch.sources.tracefs import (
    MOUNT_HINT,
    TracefsError,
    find_tracefs,
    parse_format,
    read_event_format,
)
from tcpwatch.sources.tracepoints_records import event_set

from .tracepoint_records import TRACEFS, fixture_events, sockaddr, v4

HEAD = """name: {name}
ID: 77
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

"""


def test_offsets_sizes_and_signs_come_from_the_format_file() -> None:
    fmt = read_event_format(TRACEFS, "sock", "inet_sock_set_state")
    assert fmt.title == "sock:inet_sock_set_state"
    assert fmt.id == 2287  # this boot's id, in the copied file
    skaddr, oldstate, saddr, daddr_v6 = (
        fmt.field(name) for name in ("skaddr", "oldstate", "saddr", "daddr_v6")
    )
    assert (skaddr.offset, skaddr.size, skaddr.signed, skaddr.array) == (8, 8, False, False)
    assert (oldstate.offset, oldstate.size, oldstate.signed) == (16, 4, True)
    assert (saddr.offset, saddr.size, saddr.array) == (32, 4, True)
    assert (daddr_v6.offset, daddr_v6.size) == (56, 16)
    assert fmt.record_size() == 72


def test_enum_values_are_read_from_print_fmt() -> None:
    chosen = fixture_events()
    kfree = chosen.formats[events.KFREE_SKB]
    assert kfree.value_of("reason", "NETFILTER_DROP") == 12
    assert kfree.value_of("reason", "TCP_LISTEN_OVERFLOW") == 40
    assert chosen.reset_reasons[1] == "NO_SOCKET"
    assert chosen.reset_reasons[11] == "TCP_ABORT_ON_CLOSE"
    assert (chosen.states.established, chosen.states.syn_sent) == (1, 2)
    assert (chosen.states.close, chosen.states.listen, chosen.states.syn_recv) == (7, 10, 3)
    # tcp_send_reset names its states symbolically (TCP_SYN_SENT, not 2): nothing read there
    assert chosen.formats[events.SEND_RESET].symbols["state"] == {}


def test_kernel_side_filters_use_this_kernels_numbers() -> None:
    chosen = fixture_events()
    assert chosen.filters[events.SET_STATE] == (
        "protocol == 6 && (oldstate == 2 || newstate == 2 || newstate == 10 "
        "|| (newstate == 7 && oldstate != 7 && oldstate != 3))"
    )
    assert chosen.filters[events.RETRANSMIT] == "state == 2"
    terms = chosen.filters[events.KFREE_SKB].split(" || ")
    numbers = {int(term.removeprefix("reason == ")) for term in terms}
    assert {12, 40} <= numbers  # NETFILTER_DROP, TCP_LISTEN_OVERFLOW
    assert not {2, 3} & numbers  # NOT_SPECIFIED, NO_SOCKET: every ordinary discard
    assert set(chosen.drop_reasons.values()) <= set(events.DROP_REASONS)
    assert len(chosen.drop_reasons) == len(events.DROP_REASONS)  # 6.18 has every one
    assert chosen.missing == ()


def test_an_unpacker_reads_the_fields_asked_for_in_record_order() -> None:
    fmt = read_event_format(TRACEFS, "tcp", "tcp_receive_reset")
    raw = bytearray(fmt.record_size())
    struct.pack_into("=Q", raw, fmt.field("skaddr").offset, 0xDEAD)
    struct.pack_into("=H", raw, fmt.field("dport").offset, 443)
    struct.pack_into("=Q", raw, fmt.field("sock_cookie").offset, 99)
    assert fmt.unpacker(("skaddr", "dport", "sock_cookie")).unpack_from(raw) == (0xDEAD, 443, 99)
    with pytest.raises(TracefsError, match="record order"):
        fmt.unpacker(("dport", "skaddr"))


def test_a_field_this_kernel_lacks_is_named_in_the_error() -> None:
    fmt = read_event_format(TRACEFS, "skb", "kfree_skb")
    with pytest.raises(TracefsError, match="skb:kfree_skb has no field 'saddr'"):
        fmt.field("saddr")


def test_malformed_format_files_are_refused_with_the_line() -> None:
    with pytest.raises(TracefsError, match="bad field line"):
        parse_format(HEAD.format(name="x") + "\tfield:int x;\toffset:eight;\n", "s", "x")
    with pytest.raises(TracefsError, match="no ID"):
        parse_format("name: x\nformat:\n", "s", "x")
    with pytest.raises(TracefsError, match="bad ID"):
        parse_format("name: x\nID: 12a\n", "s", "x")


def test_tracefs_not_mounted_says_how_to_mount_it(tmp_path: Path) -> None:
    with pytest.raises(TracefsError) as raised:
        find_tracefs((str(tmp_path / "tracing"), str(tmp_path / "debug" / "tracing")))
    assert MOUNT_HINT in str(raised.value) and "not mounted" in str(raised.value)
    assert find_tracefs((str(tmp_path), TRACEFS)) == TRACEFS


def test_an_event_this_kernel_lacks(tmp_path: Path) -> None:
    with pytest.raises(TracefsError, match="this kernel has no tracepoint tcp:tcp_bad_event"):
        read_event_format(TRACEFS, "tcp", "tcp_bad_event")


def _old_send_reset() -> str:
    """tcp_send_reset before 6.10: separate ports and addresses, no reason."""
    return HEAD.format(name="tcp_send_reset") + "".join(
        f"\tfield:{declaration};\toffset:{offset};\tsize:{size};\tsigned:{signed};\n"
        for declaration, offset, size, signed in (
            ("const void * skbaddr", 8, 8, 0),
            ("const void * skaddr", 16, 8, 0),
            ("int state", 24, 4, 1),
            ("__u16 sport", 28, 2, 0),
            ("__u16 dport", 30, 2, 0),
            ("__u16 family", 32, 2, 0),
            ("__u8 saddr[4]", 34, 4, 0),
            ("__u8 daddr[4]", 38, 4, 0),
            ("__u8 saddr_v6[16]", 42, 16, 0),
            ("__u8 daddr_v6[16]", 58, 16, 0),
        )
    )


def test_older_kernels_send_reset_layout_is_read_without_a_reason() -> None:
    fmt = parse_format(_old_send_reset(), "tcp", "tcp_send_reset")
    decode, reasons = events.send_reset_decoder(fmt)
    raw = bytearray(fmt.record_size())
    struct.pack_into("=QQiHHH", raw, 8, 1, 0xBEEF, 7, 8080, 40000, events.AF_INET)
    raw[34:38], raw[38:42] = v4("10.0.0.1"), v4("10.0.0.2")
    assert decode(bytes(raw), 0) == (
        0xBEEF, -1, events.AF_INET, 8080, 40000, v4("10.0.0.1") + bytes(12),
        v4("10.0.0.2") + bytes(12),
    )  # fmt: skip
    assert reasons == {}


def test_new_send_reset_layout_reads_sockaddrs() -> None:
    fmt = fixture_events().formats[events.SEND_RESET]
    decode, _ = events.send_reset_decoder(fmt)
    raw = bytearray(fmt.record_size())
    struct.pack_into("=QQiI", raw, 8, 1, 0, 2, 1)
    raw[32:60], raw[60:88] = sockaddr("::1", 9999), sockaddr("::1", 40001)
    sk, reason, family, sport, dport, source, destination = decode(bytes(raw), 0)
    assert (sk, reason, family, sport, dport) == (0, 1, events.AF_INET6, 9999, 40001)
    assert source == destination == bytes(15) + b"\x01"


def test_older_kernels_without_drop_reasons_lose_only_the_drops() -> None:
    formats = dict(fixture_events().formats)
    formats[events.KFREE_SKB] = parse_format(
        HEAD.format(name="kfree_skb")
        + "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n"
        + "\tfield:unsigned short protocol;\toffset:16;\tsize:2;\tsigned:0;\n",
        "skb",
        "kfree_skb",
    )
    chosen = event_set(formats)
    assert events.KFREE_SKB not in chosen.formats
    assert chosen.missing == (
        "drop: tracepoint skb:kfree_skb has no field 'reason' on this kernel",
    )
