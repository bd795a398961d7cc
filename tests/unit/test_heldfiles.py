"""HeldFiles: a /proc/sys file read every poll through a descriptor kept open, never a stale one.

The held case reads the host's own /proc/sys (read only, nothing is written); the namespace
cases (a held descriptor follows the namespace it was opened in, and fails once it is gone) are
in tests/integration/test_held_sysctls.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tcpwatch.paths import read_small_text
from tcpwatch.sources import heldfiles
from tcpwatch.sources.heldfiles import HeldFiles

SOMAXCONN = "/proc/sys/net/core/somaxconn"
FIN_TIMEOUT = "/proc/sys/net/ipv4/tcp_fin_timeout"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_proc_sys_file_is_opened_once_and_reads_what_an_open_reads() -> None:
    held = HeldFiles()
    try:
        for _ in range(5):
            assert held.read(7, SOMAXCONN, 4096) == read_small_text(SOMAXCONN, 4096)
        assert held.opens == 1 and held.held == 1
    finally:
        held.close()


def test_a_regular_file_is_opened_every_time_so_a_replaced_one_is_read_anew(
    tmp_path: Path,
) -> None:
    # A fixture tree (--path.procfs): files have a size, so none is held; one replaced by a
    # rename would otherwise be read through its old inode.
    path = tmp_path / "somaxconn"
    path.write_text("128\n")
    held = HeldFiles()
    assert held.read(7, str(path), 4096) == "128\n"
    replacement = tmp_path / "new"
    replacement.write_text("4096\n")
    replacement.rename(path)
    assert held.read(7, str(path), 4096) == "4096\n"
    assert held.opens == 2 and held.held == 0


def test_an_empty_regular_file_is_not_held(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("")
    held = HeldFiles()
    assert held.read(7, str(path), 4096) == ""
    path.write_text("5\n")
    assert held.read(7, str(path), 4096) == "5\n"
    assert held.held == 0


def test_a_missing_file_raises_and_is_looked_for_again(tmp_path: Path) -> None:
    held = HeldFiles()
    path = tmp_path / "later"
    with pytest.raises(FileNotFoundError):
        held.read(7, str(path), 4096)
    path.write_text("1\n")
    assert held.read(7, str(path), 4096) == "1\n"


def test_a_failing_held_descriptor_is_closed_and_the_file_opened_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As a namespace gone away makes every read of its descriptors fail with ENOENT.
    held = HeldFiles()
    try:
        held.read(7, SOMAXCONN, 4096)
        before = _open_fds()

        def gone(fd: int, size: int, offset: int) -> bytes:
            raise OSError(errno.ENOENT, "No such file or directory")

        monkeypatch.setattr(heldfiles.os, "pread", gone)
        # The text comes from a fresh open, not from the failed descriptor.
        assert held.read(7, SOMAXCONN, 4096) == read_small_text(SOMAXCONN, 4096)
        assert held.opens == 2
        monkeypatch.undo()
        assert _open_fds() == before  # the failed one closed, the fresh one held instead
        assert held.read(7, SOMAXCONN, 4096) == read_small_text(SOMAXCONN, 4096)
        assert held.opens == 2
    finally:
        held.close()


def test_descriptors_of_a_key_not_read_in_a_poll_are_closed() -> None:
    held = HeldFiles()
    before = _open_fds()
    held.read("a", SOMAXCONN, 4096)
    held.read("b", SOMAXCONN, 4096)
    held.read("b", FIN_TIMEOUT, 4096)
    held.end_poll()
    assert held.held == 3
    held.read("b", SOMAXCONN, 4096)
    held.end_poll()  # "a" was not read since the last end_poll: its namespace is gone
    assert held.held == 2 and _open_fds() == before + 2
    held.close()
    assert held.held == 0 and _open_fds() == before


def test_no_more_than_max_held_descriptors() -> None:
    held = HeldFiles(max_held=1)
    try:
        held.read("a", SOMAXCONN, 4096)
        for _ in range(3):
            assert held.read("a", FIN_TIMEOUT, 4096) == read_small_text(FIN_TIMEOUT, 4096)
        assert held.held == 1 and held.opens == 4
    finally:
        held.close()
