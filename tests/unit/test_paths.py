"""paths.py: the procfs sanity check and the one way sources read procfs files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcpwatch.paths import procfs_problem, read_bytes, read_small_text, read_text


def test_procfs_problem_names_the_directory_until_it_has_net_sockstat(tmp_path: Path) -> None:
    assert procfs_problem(str(tmp_path)) == (
        f"{tmp_path} does not look like a procfs mount (no net/sockstat)"
    )
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "sockstat").write_text("TCP: inuse 1\n")
    assert procfs_problem(str(tmp_path)) is None
    assert procfs_problem("/proc") is None


def test_read_text_is_strict_ascii_by_default_and_bounded_on_request(tmp_path: Path) -> None:
    table = tmp_path / "netstat"
    table.write_text("TcpExt: ListenOverflows\nTcpExt: 3\n")
    assert read_text(str(table)) == "TcpExt: ListenOverflows\nTcpExt: 3\n"
    assert read_text(str(table), limit=6) == "TcpExt"
    odd = tmp_path / "hostname"
    odd.write_bytes(b"caf\xc3\xa9\xff\n")
    with pytest.raises(UnicodeDecodeError):
        read_text(str(odd))
    assert read_text(str(odd), encoding="utf-8", errors="replace") == "caf\u00e9\ufffd\n"
    with pytest.raises(FileNotFoundError):
        read_text(str(tmp_path / "absent"))


def test_read_bytes_returns_raw_bytes_up_to_the_limit(tmp_path: Path) -> None:
    comm = tmp_path / "comm"
    comm.write_bytes(b"ngin\rx\xff\n")
    assert read_bytes(str(comm)) == b"ngin\rx\xff\n"
    assert read_bytes(str(comm), 4) == b"ngin"


def test_read_small_text_reads_like_read_text_within_its_byte_bound(tmp_path: Path) -> None:
    value = tmp_path / "somaxconn"
    value.write_text("4096\n")
    assert read_small_text(str(value), 4096) == read_text(str(value)) == "4096\n"
    assert read_small_text(str(value), 2) == "40"
    assert read_small_text("/proc/sys/net/core/somaxconn", 4096) == read_text(
        "/proc/sys/net/core/somaxconn"
    )
    odd = tmp_path / "odd"
    odd.write_bytes(b"1\xff\n")
    with pytest.raises(UnicodeDecodeError):
        read_small_text(str(odd), 4096)
    with pytest.raises(FileNotFoundError):
        read_small_text(str(tmp_path / "absent"), 4096)
