"""FileMemo: a value read from rarely changing files is reused exactly while they stat the same;
the persisted sysctl lines through it, on a fixture root in tmp_path."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tcpwatch.model import PersistedSysctl
from tcpwatch.sources.filememo import RACY_NS, FileMemo
from tcpwatch.sources.sysctl_files import read_persisted_sysctls, read_watched


def _settled(path: Path, seconds_ago: int = 10) -> None:
    """Stamp a file's mtime in the past, as an edit long before the poll would have left it."""
    at = time.time_ns() - seconds_ago * 1_000_000_000
    os.utime(path, ns=(at, at))


def _memo(clock: list[float]) -> FileMemo:
    # Reads happen "later" than every ctime the test makes: nothing counts as racily clean.
    return FileMemo(clock=lambda: clock[0], wall_ns=lambda: time.time_ns() + 2 * RACY_NS)


def _root(tmp_path: Path) -> Path:
    (tmp_path / "etc" / "sysctl.d").mkdir(parents=True)
    (tmp_path / "etc" / "sysctl.d" / "10-a.conf").write_text("net.core.somaxconn = 1024\n")
    (tmp_path / "etc" / "sysctl.conf").write_text("net.ipv4.tcp_tw_recycle = 1\n")
    return tmp_path


def test_unchanged_files_are_read_once_and_the_value_is_the_same(tmp_path: Path) -> None:
    root = str(_root(tmp_path))
    clock = [0.0]
    memo = _memo(clock)
    first = memo.reuse("k", lambda: read_watched(root))
    for step in range(1, 10):
        clock[0] = float(step)
        assert memo.reuse("k", lambda: read_watched(root)) is first
    assert memo.reads == 1
    assert first == read_persisted_sysctls(root)


def test_an_edit_a_new_drop_in_or_a_removed_file_is_seen_at_the_next_poll(tmp_path: Path) -> None:
    root = _root(tmp_path)
    memo = _memo([0.0])

    def read() -> tuple[PersistedSysctl, ...]:
        return memo.reuse("k", lambda: read_watched(str(root)))

    read()
    conf = root / "etc" / "sysctl.d" / "10-a.conf"
    conf.write_text("net.core.somaxconn = 4096\n")  # same size, in place
    _settled(conf)
    assert read()[0].value == "4096"
    (root / "etc" / "sysctl.d" / "20-b.conf").write_text("net.ipv4.tcp_fin_timeout = 30\n")
    assert [e.name for e in read()] == [
        "net.core.somaxconn",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_tw_recycle",
    ]
    (root / "etc" / "sysctl.conf").unlink()
    assert "net.ipv4.tcp_tw_recycle" not in [e.name for e in read()]
    (root / "run" / "sysctl.d").mkdir(parents=True)  # a directory that was absent appears
    (root / "run" / "sysctl.d" / "30-c.conf").write_text("net.ipv4.tcp_syncookies = 1\n")
    assert "net.ipv4.tcp_syncookies" in [e.name for e in read()]
    assert memo.reads == 5


def test_a_re_pointed_symlink_is_a_change(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "one.conf").write_text("net.core.somaxconn = 1\n")
    (root / "two.conf").write_text("net.core.somaxconn = 2\n")
    link = root / "etc" / "sysctl.d" / "10-a.conf"
    link.unlink()
    link.symlink_to("/one.conf")  # absolute: below the root, as the host would follow it
    memo = _memo([0.0])
    assert memo.reuse("k", lambda: read_watched(str(root)))[0].value == "1"
    link.unlink()
    link.symlink_to("/two.conf")
    assert memo.reuse("k", lambda: read_watched(str(root)))[0].value == "2"


def test_a_value_read_right_after_a_change_is_read_again_and_none_lives_past_max_age(
    tmp_path: Path,
) -> None:
    root = str(_root(tmp_path))
    clock = [0.0]
    # The real wall clock: the fixture files were written just now, within RACY_NS of the read,
    # so a second write in the same tick of the file clock could hide: no reuse yet.
    racy = FileMemo(clock=lambda: clock[0])
    racy.reuse("k", lambda: read_watched(root))
    racy.reuse("k", lambda: read_watched(root))
    assert racy.reads == 2
    memo = FileMemo(
        clock=lambda: clock[0], max_age=60.0, wall_ns=lambda: time.time_ns() + 2 * RACY_NS
    )
    memo.reuse("k", lambda: read_watched(root))
    clock[0] = 59.0
    memo.reuse("k", lambda: read_watched(root))
    assert memo.reads == 1
    clock[0] = 60.0
    memo.reuse("k", lambda: read_watched(root))
    assert memo.reads == 2


def test_a_text_equal_to_the_last_one_is_not_parsed_again_and_gone_keys_are_forgotten() -> None:
    memo = FileMemo()
    parsed: list[str] = []

    def parse(text: str) -> dict[str, int]:
        parsed.append(text)
        return {"TcpActiveOpens": int(text)}

    first = memo.parsed((1, "/proc/net/snmp"), "5", parse)
    assert memo.parsed((1, "/proc/net/snmp"), "5", parse) is first
    assert memo.parsed((1, "/proc/net/snmp"), "6", parse) == {"TcpActiveOpens": 6}
    assert memo.parsed((2, "/proc/net/snmp"), "6", parse) == {"TcpActiveOpens": 6}  # own key
    assert parsed == ["5", "6", "6"] and memo.parses == 3
    memo.end_poll()
    memo.parsed((1, "/proc/net/snmp"), "6", parse)  # namespace 2 was not polled this time
    memo.end_poll()
    memo.parsed((2, "/proc/net/snmp"), "6", parse)
    assert parsed == ["5", "6", "6", "6"]  # forgotten: parsed again


def test_the_counters_read_through_a_memo_equal_a_fresh_read(tmp_path: Path) -> None:
    from tcpwatch.paths import ProcPaths
    from tcpwatch.sources.procnet import read_churn_marks, read_counters

    net = tmp_path / "net"
    net.mkdir()
    (net / "netstat").write_text("TcpExt: ListenOverflows ListenDrops\nTcpExt: 3 4\n")
    snmp = (
        "Tcp: ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs "
        "RetransSegs InErrs OutRsts\nTcp: {} 2 0 0 1 10 10 0 0 0\n"
    )
    (net / "snmp").write_text(snmp.format(1))
    (net / "sockstat").write_text("TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1\n")
    paths = ProcPaths(root=str(tmp_path))
    memo = FileMemo()
    for opens in (1, 1, 7, 7):
        (net / "snmp").write_text(snmp.format(opens))
        assert read_counters(paths, memo, 9) == read_counters(paths)
        assert read_counters(paths, memo, 9).values["TcpActiveOpens"] == opens
        assert read_churn_marks(paths, False, memo, 9) == read_churn_marks(paths)
    assert memo.parses == 3  # netstat once, snmp once per distinct text


def test_a_fingerprint_is_each_path_stat_and_lstat_links_and_absent_paths_included(
    tmp_path: Path,
) -> None:
    from tcpwatch.sources.filememo import fingerprint

    plain = tmp_path / "plain.conf"
    plain.write_text("a = 1\n")
    link = tmp_path / "link.conf"
    link.symlink_to(plain)
    absent = tmp_path / "absent.conf"

    def stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    # One lstat stands for both when a path is not a link: the same values as two calls.
    assert fingerprint([str(plain), str(link), str(absent)]) == (
        stamp(os.stat(plain)),
        stamp(os.lstat(plain)),
        stamp(os.stat(link)),
        stamp(os.lstat(link)),
        "FileNotFoundError",
        "FileNotFoundError",
    )
    assert stamp(os.stat(link)) != stamp(os.lstat(link))
