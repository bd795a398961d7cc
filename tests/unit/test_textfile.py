"""`tcpwatch metrics --output`: the file appears whole, readable by node_exporter's user, or not."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tcpwatch.errors import UsageError
from tcpwatch.textfile import write_atomically


def test_writes_content_readable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "tcpwatch.prom"
    previous = os.umask(0o077)
    try:
        write_atomically(str(target), b"tcpwatch_build_info 1\n")
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"tcpwatch_build_info 1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["tcpwatch.prom"]


def test_replaces_an_existing_file_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "tcpwatch.prom"
    target.write_bytes(b"old\n")
    old_inode = target.stat().st_ino
    reader = target.open("rb")  # a reader holding the old file keeps reading the old content
    try:
        write_atomically(str(target), b"new\n" * 100_000)
        assert reader.read() == b"old\n"
    finally:
        reader.close()
    assert target.stat().st_ino != old_inode
    assert target.read_bytes() == b"new\n" * 100_000
    assert os.listdir(tmp_path) == ["tcpwatch.prom"]


def test_a_missing_directory_is_a_one_line_usage_error(tmp_path: Path) -> None:
    target = tmp_path / "absent" / "tcpwatch.prom"
    with pytest.raises(UsageError) as raised:
        write_atomically(str(target), b"x\n")
    message = str(raised.value)
    assert "\n" not in message
    assert str(target) in message and "No such file or directory" in message


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "tcpwatch.prom"
    target.mkdir()  # renaming a file over a directory fails
    with pytest.raises(UsageError, match="cannot write"):
        write_atomically(str(target), b"x\n")
    assert os.listdir(tmp_path) == ["tcpwatch.prom"]
