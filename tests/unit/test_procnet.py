"""/proc/net counter and sockstat parsers, fed the real files copied into tests/fixtures/proc."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.model import KernelCounters, Snapshot, SockStat
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import procnet
from tcpwatch.sources.base import FileMemo, SourceContext
from tcpwatch.sources.procnet import (
    CHURN_FIELDS,
    ProcParseError,
    marks_before_dump,
    parse_churn_fields,
    parse_counter_table,
    parse_sockstat,
    read_churn_marks,
    read_counters,
    read_sockstat,
)

FIXTURE_ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "proc"
FIXTURE = ProcPaths(root=str(FIXTURE_ROOT))
# Values nstat leaves out as "useless" (not counters); we keep them.
NSTAT_SKIPS = {
    "IpForwarding",
    "IpDefaultTTL",
    "TcpRtoAlgorithm",
    "TcpRtoMin",
    "TcpRtoMax",
    "TcpMaxConn",
    "TcpCurrEstab",
}


def fixture_text(name: str) -> str:
    return (FIXTURE_ROOT / "net" / name).read_text()


def header_field_count(text: str) -> int:
    lines = text.splitlines()
    return sum(len(line.split()) - 1 for line in lines[0::2])


# --- parse_counter_table ----------------------------------------------------------------------


def test_docstring_example() -> None:
    text = (
        "TcpExt: SyncookiesSent ListenOverflows\n"
        "TcpExt: 0 3\n"
        "Tcp: RtoAlgorithm MaxConn CurrEstab\n"
        "Tcp: 1 -1 2\n"
    )
    assert parse_counter_table(text, "/proc/net/x") == {
        "TcpExtSyncookiesSent": 0,
        "TcpExtListenOverflows": 3,
        "TcpRtoAlgorithm": 1,
        "TcpMaxConn": -1,
        "TcpCurrEstab": 2,
    }


def test_fixture_netstat_values() -> None:
    text = fixture_text("netstat")
    counters = parse_counter_table(text, "netstat")
    assert len(counters) == header_field_count(text) == 229
    assert counters["TcpExtTW"] == 10
    assert counters["TcpExtDelayedACKLost"] == 1
    assert counters["TcpExtTCPHPHits"] == 9
    assert counters["TcpExtListenOverflows"] == 0
    assert counters["TcpExtTCPAODroppedIcmps"] == 0  # last field of the TcpExt line
    assert counters["IpExtInOctets"] == 58660694
    assert counters["MPTcpExtWinProbe"] == 0


def test_fixture_snmp_values_keep_signs_and_icmpmsg() -> None:
    text = fixture_text("snmp")
    counters = parse_counter_table(text, "snmp")
    assert len(counters) == header_field_count(text) == 83
    assert counters["TcpMaxConn"] == -1
    assert counters["TcpActiveOpens"] == 14
    assert counters["TcpOutRsts"] == 6
    assert counters["TcpCurrEstab"] == 0
    assert counters["IpForwarding"] == 2
    assert counters["IcmpMsgInType3"] == 1  # IcmpMsg columns exist only for types seen
    assert counters["UdpInDatagrams"] == 27
    assert counters["UdpLiteMemErrors"] == 0


def test_read_counters_merges_both_files() -> None:
    counters = read_counters(FIXTURE)
    netstat = parse_counter_table(fixture_text("netstat"), "netstat")
    snmp = parse_counter_table(fixture_text("snmp"), "snmp")
    assert dict(counters.values) == netstat | snmp
    assert len(counters.values) == len(netstat) + len(snmp)
    assert counters.get("TcpExtTW") == 10
    assert counters.get("TcpMaxConn") == -1
    assert counters.get("NoSuchCounter") is None


def test_names_and_values_match_nstat_parsing_the_same_files(tmp_path: Path) -> None:
    """nstat reads the files named by PROC_NET_*; it must name every counter as we do."""
    environment = {
        **os.environ,
        "PROC_NET_NETSTAT": str(FIXTURE_ROOT / "net" / "netstat"),
        "PROC_NET_SNMP": str(FIXTURE_ROOT / "net" / "snmp"),
        "PROC_NET_SNMP6": os.devnull,
        "NSTAT_HISTORY": str(tmp_path / "history"),
    }
    result = subprocess.run(
        ["nstat", "--json", "-a", "-s", "-z"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    from_nstat: dict[str, int] = json.loads(result.stdout)["kernel"]
    ours = dict(read_counters(FIXTURE).values)
    assert len(from_nstat) == 305
    assert set(ours) - set(from_nstat) == NSTAT_SKIPS
    assert {name: ours[name] for name in from_nstat} == from_nstat


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "TcpExt: A B\nTcpExt: 1 2\nIpExt: X\nIpExt: 1 2\n",
            '/proc/net/netstat:4: expected as many values as names in "IpExt: 1 2"',
        ),
        (
            "TcpExt: A B C\nTcpExt: 1 2\n",
            '/proc/net/netstat:2: expected as many values as names in "TcpExt: 1 2"',
        ),
        (
            "Tcp: ActiveOpens PassiveOpens\nTcp: 1 x\n",
            '/proc/net/netstat:2: expected integer values in "Tcp: 1 x"',
        ),
        (
            "Tcp: ActiveOpens\nTcp: 1\nUdp: InDatagrams\n",
            '/proc/net/netstat:4: missing the value line after "Udp:"',
        ),
        (
            "Tcp: ActiveOpens\nUdp: 1\n",
            '/proc/net/netstat:2: expected a "Tcp:" value line in "Udp: 1"',
        ),
        (
            "Tcp: ActiveOpens\nTcp 1\n",
            '/proc/net/netstat:2: expected a "Tcp:" value line in "Tcp 1"',
        ),
        (
            "some garbage\nTcp: 1\n",
            '/proc/net/netstat:1: expected a "Prefix: names" line in "some garbage"',
        ),
        (
            "Tcp: 1 2\nTcp: 3 4\n",
            '/proc/net/netstat:1: expected counter names in "Tcp: 1 2"',
        ),
        ("", "/proc/net/netstat:1: empty file"),
    ],
)
def test_malformed_counter_tables(text: str, message: str) -> None:
    with pytest.raises(ProcParseError) as caught:
        parse_counter_table(text, "/proc/net/netstat")
    assert str(caught.value) == message
    assert caught.value.path == "/proc/net/netstat"
    assert f":{caught.value.line}:" in message


def test_empty_icmpmsg_pair_is_accepted() -> None:
    assert parse_counter_table("IcmpMsg:\nIcmpMsg:\nTcp: A\nTcp: 7\n", "snmp") == {"TcpA": 7}


@pytest.mark.parametrize("name", ["netstat", "snmp"])
def test_truncated_files_fail_loudly_or_keep_their_prefix(name: str) -> None:
    """Cut the real file at every byte: either a ProcParseError naming a real line, or the
    counters read so far, where only the last number may have lost trailing digits."""
    text = fixture_text(name)
    full = parse_counter_table(text, name)
    line_count = len(text.splitlines())
    failures = 0
    for cut in range(len(text)):
        try:
            partial = parse_counter_table(text[:cut], name)
        except ProcParseError as error:
            failures += 1
            assert error.path == name
            assert 1 <= error.line <= line_count + 1
            continue
        differing = [key for key, value in partial.items() if full[key] != value]
        assert len(differing) <= 1, (cut, differing)
        for key in differing:
            assert str(full[key]).startswith(str(partial[key])), (cut, key)
    # Most cuts land inside a line and must be caught.
    assert failures > len(text) * 0.9


def test_long_offending_text_is_shortened_in_the_message() -> None:
    line = "TcpExt: " + " ".join(["1"] * 500)
    with pytest.raises(ProcParseError) as caught:
        parse_counter_table("TcpExt: A\n" + line + "\n", "netstat")
    assert caught.value.text == line
    rendered = str(caught.value)
    assert rendered.startswith('netstat:2: expected as many values as names in "TcpExt: 1 1')
    assert rendered.endswith('..."')
    assert len(rendered) < 200
    assert "\n" not in rendered


# --- sockstat -----------------------------------------------------------------------------------


def test_fixture_sockstat() -> None:
    assert read_sockstat(FIXTURE) == SockStat(
        inuse_ipv4=1, inuse_ipv6=0, orphan=0, time_wait=0, alloc=1, memory_pages=165
    )


def test_sockstat_docstring_example() -> None:
    text4 = "sockets: used 12\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 165\nUDP: inuse 0 mem 0\n"
    text6 = "TCP6: inuse 3\nUDP6: inuse 0\n"
    assert parse_sockstat(text4, text6, "/proc/net/sockstat") == SockStat(
        inuse_ipv4=5, inuse_ipv6=3, orphan=0, time_wait=2, alloc=7, memory_pages=165
    )


def test_sockstat_without_ipv6() -> None:
    text4 = "TCP: inuse 5 orphan 1 tw 2 alloc 7 mem 9\n"
    stat = parse_sockstat(text4, None, "/proc/net/sockstat")
    assert stat.inuse_ipv6 == 0
    assert (stat.inuse_ipv4, stat.orphan, stat.time_wait, stat.alloc, stat.memory_pages) == (
        5,
        1,
        2,
        7,
        9,
    )


def test_sockstat_ignores_fields_it_does_not_know() -> None:
    text4 = "TCP: inuse 5 orphan 1 tw 2 alloc 7 mem 9 future 3\n"
    assert parse_sockstat(text4, None, "s").memory_pages == 9


@pytest.mark.parametrize(
    ("text4", "text6", "message"),
    [
        (
            "sockets: used 1\nUDP: inuse 0 mem 0\n",
            None,
            '/proc/net/sockstat:3: no "TCP:" line',
        ),
        (
            "sockets: used 1\nTCP: inuse 1 orphan 0\n",
            None,
            '/proc/net/sockstat:2: missing tw, alloc, mem in "TCP: inuse 1 orphan 0"',
        ),
        (
            "TCP: inuse 1 orphan 0 tw x alloc 1 mem 2\n",
            None,
            '/proc/net/sockstat:1: expected integer values in "TCP: inuse 1 orphan 0 tw x alloc 1 '
            'mem 2"',
        ),
        (
            "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem\n",
            None,
            '/proc/net/sockstat:1: expected key/value pairs in "TCP: inuse 1 orphan 0 tw 0 alloc 1 '
            'mem"',
        ),
        (
            "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 2\n",
            "UDP6: inuse 0\n",
            '/proc/net/sockstat6:2: no "TCP6:" line',
        ),
        (
            "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 2\n",
            "TCP6: inuse\n",
            '/proc/net/sockstat6:1: expected key/value pairs in "TCP6: inuse"',
        ),
        (
            "TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 2\n",
            "TCP6: used 4\n",
            '/proc/net/sockstat6:1: missing inuse in "TCP6: used 4"',
        ),
    ],
)
def test_malformed_sockstat(text4: str, text6: str | None, message: str) -> None:
    with pytest.raises(ProcParseError) as caught:
        parse_sockstat(text4, text6, "/proc/net/sockstat")
    assert str(caught.value) == message


def test_sockstat6_errors_name_the_given_path() -> None:
    with pytest.raises(ProcParseError) as caught:
        parse_sockstat("TCP: inuse 1 orphan 0 tw 0 alloc 1 mem 2\n", "", "a/sockstat", "b/six")
    assert caught.value.path == "b/six"


# --- reading files ------------------------------------------------------------------------------


def make_root(tmp_path: Path, files: dict[str, str]) -> ProcPaths:
    for name, text in files.items():
        (tmp_path / "net").mkdir(exist_ok=True)
        (tmp_path / "net" / name).write_text(text)
    return ProcPaths(root=str(tmp_path))


def test_read_sockstat_without_sockstat6_file(tmp_path: Path) -> None:
    paths = make_root(tmp_path, {"sockstat": "TCP: inuse 4 orphan 0 tw 3 alloc 5 mem 6\n"})
    assert read_sockstat(paths) == SockStat(4, 0, 0, 3, 5, 6)


def test_read_sockstat_missing_file_names_the_path(tmp_path: Path) -> None:
    paths = make_root(tmp_path, {"sockstat6": "TCP6: inuse 1\n"})
    with pytest.raises(FileNotFoundError) as caught:
        read_sockstat(paths)
    assert caught.value.filename == paths.net("sockstat")


def test_read_counters_missing_file_names_the_path(tmp_path: Path) -> None:
    paths = make_root(tmp_path, {"netstat": fixture_text("netstat")})
    with pytest.raises(FileNotFoundError) as caught:
        read_counters(paths)
    assert caught.value.filename == paths.net("snmp")


def test_read_counters_malformed_file_names_the_path(tmp_path: Path) -> None:
    paths = make_root(tmp_path, {"netstat": fixture_text("netstat"), "snmp": "Tcp: A B\nTcp: 1\n"})
    with pytest.raises(ProcParseError) as caught:
        read_counters(paths)
    assert (
        str(caught.value) == f'{paths.net("snmp")}:2: expected as many values as names in "Tcp: 1"'
    )


def test_read_counters_follows_net_dir(tmp_path: Path) -> None:
    (tmp_path / "thread-self" / "net").mkdir(parents=True)
    (tmp_path / "thread-self" / "net" / "netstat").write_text("TcpExt: TW\nTcpExt: 4\n")
    (tmp_path / "thread-self" / "net" / "snmp").write_text("Tcp: CurrEstab\nTcp: 9\n")
    counters = read_counters(ProcPaths(root=str(tmp_path), net_dir="thread-self/net"))
    assert dict(counters.values) == {"TcpExtTW": 4, "TcpCurrEstab": 9}


# --- churn marks (derived ESTABLISHED, issue 21 item 11) -----------------------------------------


def test_churn_marks_from_the_fixture() -> None:
    snmp = parse_counter_table(fixture_text("snmp"), "snmp")
    marks = read_churn_marks(FIXTURE)
    assert marks.tcp == tuple(snmp[name] for name in CHURN_FIELDS)
    sockstat = read_sockstat(FIXTURE)
    assert (marks.inuse_ipv4, marks.inuse_ipv6) == (sockstat.inuse_ipv4, sockstat.inuse_ipv6)
    assert read_churn_marks(FIXTURE, after=True) == marks


def test_churn_marks_move_with_any_of_their_fields(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    for name in ("snmp", "sockstat", "sockstat6"):
        (tmp_path / "net" / name).write_text(fixture_text(name))
    paths = ProcPaths(root=str(tmp_path))
    before = read_churn_marks(paths)
    snmp = fixture_text("snmp").splitlines()
    header = next(i for i, line in enumerate(snmp) if line.startswith("Tcp:"))
    names = snmp[header].split()[1:]
    for field in CHURN_FIELDS:
        values = snmp[header + 1].split()
        index = names.index(field.removeprefix("Tcp")) + 1
        values[index] = str(int(values[index]) + 1)
        changed = [*snmp[: header + 1], " ".join(values), *snmp[header + 2 :]]
        (tmp_path / "net" / "snmp").write_text("\n".join(changed) + "\n")
        assert read_churn_marks(paths, after=True) != before, field
    (tmp_path / "net" / "snmp").write_text(fixture_text("snmp"))
    assert read_churn_marks(paths, after=True) == before


def _context(paths: ProcPaths) -> SourceContext:
    return SourceContext(paths, CollectSettings(), "test", 0, 0.0)


def test_marks_before_the_dump_are_this_polls_tables_when_both_were_read(tmp_path: Path) -> None:
    counters, sockstat = read_counters(FIXTURE), read_sockstat(FIXTURE)
    so_far = Snapshot("test", 0.0, None, counters, sockstat, None, None)
    # Nothing to read under tmp_path: the marks can only come from the snapshot's tables.
    marks = marks_before_dump(_context(ProcPaths(root=str(tmp_path))), so_far)
    assert marks == read_churn_marks(FIXTURE)
    assert marks.signature == read_churn_marks(FIXTURE).signature


def test_marks_before_the_dump_are_read_when_a_table_is_missing(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    for name in ("snmp", "sockstat", "sockstat6"):
        (tmp_path / "net" / name).write_text(fixture_text(name))
    paths = ProcPaths(root=str(tmp_path))
    sockstat = read_sockstat(FIXTURE)
    moved = SockStat(sockstat.inuse_ipv4 + 1, sockstat.inuse_ipv6, 0, 0, 0, 0)
    for so_far in (
        Snapshot("test", 0.0, None, None, moved, None, None),  # counters failed
        Snapshot("test", 0.0, None, read_counters(FIXTURE), None, None, None),  # sockstat did
    ):
        assert marks_before_dump(_context(paths), so_far) == read_churn_marks(paths)
    with pytest.raises(FileNotFoundError):
        marks_before_dump(_context(ProcPaths(root=str(tmp_path / "none"))), so_far)


def test_marks_from_tables_need_every_field() -> None:
    counters = KernelCounters(values={"TcpActiveOpens": 1})
    sockstat = read_sockstat(FIXTURE)
    so_far = Snapshot("test", 0.0, None, counters, sockstat, None, None)
    with pytest.raises(ProcParseError, match="missing TcpInSegs"):
        marks_before_dump(_context(FIXTURE), so_far)


def test_churn_marks_need_every_field() -> None:
    text = "Tcp: ActiveOpens PassiveOpens\nTcp: 1 2\n"
    with pytest.raises(ProcParseError, match="missing TcpAttemptFails, TcpEstabResets"):
        parse_churn_fields(text, "/proc/net/snmp")


# --- /proc/net tables read through held descriptors (the host's own, read only) --------------


def test_proc_net_tables_are_held_per_namespace_and_closed_with_it() -> None:
    memo = FileMemo()
    host = ProcPaths()
    try:
        for _ in range(3):
            counters = read_counters(host, memo, 7)
            sockstat = read_sockstat(host, memo, 7)
            marks = read_churn_marks(host, True, memo, 7)
        # snmp, netstat, sockstat and (with IPv6) sockstat6: opened on the first poll only.
        tables = 3 + os.path.exists(host.net("sockstat6"))
        assert memo.held.opens == tables and memo.held.held == tables
        fresh = read_counters(host)
        for name in ("TcpRtoAlgorithm", "TcpMaxConn", "IpDefaultTTL"):
            assert counters.values[name] == fresh.values[name]
        assert set(counters.values) == set(fresh.values)
        assert sockstat.alloc >= 0 and marks.tcp
        memo.end_poll()
        assert memo.held.held == tables  # read in the poll that just ended
        memo.end_poll()
        assert memo.held.held == 0  # a namespace not polled: its descriptors are closed
    finally:
        memo.held.close()


def test_proc_net_tables_of_an_unknown_namespace_or_a_fixture_tree_are_never_held() -> None:
    memo = FileMemo()
    try:
        read_counters(ProcPaths(), memo, 0)  # inode unknown: no key to hold them under
        read_sockstat(FIXTURE, memo, 7)  # regular files (size > 0): opened every time
        read_counters(FIXTURE, memo, 7)
        assert memo.held.held == 0
        assert read_counters(FIXTURE, memo, 7) == read_counters(FIXTURE)
        assert read_sockstat(FIXTURE, memo, 7) == read_sockstat(FIXTURE)
    finally:
        memo.held.close()


def test_a_table_as_long_as_the_held_limit_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    memo = FileMemo()
    host = ProcPaths()
    try:
        monkeypatch.setattr(procnet, "_HELD_LIMIT", 64)  # netstat is thousands of bytes
        counters = read_counters(host, memo, 7)
        assert set(counters.values) == set(read_counters(host).values)
    finally:
        memo.held.close()
