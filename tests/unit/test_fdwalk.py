"""The fd-table read by name (fdwalk.wanted_sockets_in on the live procfs) and the walk's order.

The read-by-name tests use this test process' own /proc/self/fd with AF_UNIX socket pairs
placed at chosen fd numbers (dup2): no network, nothing outside the process."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tcpwatch.sources import fdwalk
from tcpwatch.sources.fdwalk import (
    MAX_HOLES,
    counts_fds,
    ranked,
    socket_links,
    wanted_sockets_in,
)
from tcpwatch.sources.processes import _scan_order
from tests.unit.test_processes import build_proc

FD_DIR = f"/proc/{os.getpid()}/fd"  # not /proc/self: the links are read relative to it


@contextlib.contextmanager
def placed_sockets(numbers: list[int]) -> Iterator[dict[int, int]]:
    """fd number -> socket inode: one end of a fresh socket pair moved to each number (the
    other end stays where the kernel put it: another socket, not wanted)."""
    placed: dict[int, int] = {}
    others: list[socket.socket] = []
    try:
        for number in numbers:
            left, right = socket.socketpair()
            others.append(right)
            if left.fileno() == number:
                left.detach()  # already there (the lowest free number)
            else:
                os.dup2(left.fileno(), number)
                left.close()
            placed[number] = os.fstat(number).st_ino
        yield placed
    finally:
        for number in placed:
            os.close(number)
        for right in others:
            right.close()


def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of os.readlink failures and os.listdir calls made by the walk."""
    calls = {"missing": 0, "listdir": 0}
    readlink, listdir = os.readlink, os.listdir

    def counted_readlink(path: str, *, dir_fd: int | None = None) -> str:
        try:
            return readlink(path, dir_fd=dir_fd)
        except FileNotFoundError:
            calls["missing"] += 1
            raise

    def counted_listdir(path: int) -> list[str]:
        calls["listdir"] += 1
        return listdir(path)

    monkeypatch.setattr(fdwalk.os, "readlink", counted_readlink)
    monkeypatch.setattr(fdwalk.os, "listdir", counted_listdir)
    return calls


def test_the_live_procfs_counts_and_a_fixture_does_not(tmp_path: Path) -> None:
    assert counts_fds("/proc")
    assert not counts_fds(str(tmp_path))


def test_a_dense_table_is_read_by_name_without_a_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    lowest_free = os.dup(0)  # below the count: fds 0..lowest_free - 1 are all open
    os.close(lowest_free)
    with placed_sockets([lowest_free]) as placed:
        ((number, inode),) = placed.items()
        calls = counting(monkeypatch)
        found = wanted_sockets_in(FD_DIR, socket_links({inode}), counted=True)
    assert found == [(inode, str(number))]
    kernel_counts = os.stat(FD_DIR).st_size > 0  # Linux >= 6.2
    assert calls["listdir"] == (0 if kernel_counts else 1)


def test_a_socket_past_the_count_is_found_by_the_listing_of_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fd 900 lies far above the number of open fds: the names stop at the count, the listing
    # from there on finds it, and the names below it are not read twice.
    with placed_sockets([900]) as placed:
        calls = counting(monkeypatch)
        found = wanted_sockets_in(FD_DIR, socket_links(placed.values()), counted=True)
        listed = wanted_sockets_in(FD_DIR, socket_links(placed.values()))
    assert found == listed == [(placed[900], "900")]
    assert calls["listdir"] == 2  # once each: the rest of the first read, the whole second


def test_a_sparse_table_is_listed_after_max_holes_failed_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 200 fds opened and the lower 100 closed leave ~100 holes below the count: the walk gives
    # up names after MAX_HOLES + 1 failures and lists the rest, still finding every socket.
    spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
    try:
        for fd in spare[:100]:
            os.close(fd)
        with placed_sockets([700, 800, 950]) as placed:
            calls = counting(monkeypatch)
            found = wanted_sockets_in(FD_DIR, socket_links(placed.values()), counted=True)
    finally:
        for fd in spare[100:]:
            os.close(fd)
    assert sorted(found) == sorted((inode, str(fd)) for fd, inode in placed.items())
    if os.stat(FD_DIR).st_size > 0:  # Linux >= 6.2 counts: the names were tried first
        assert calls["missing"] == MAX_HOLES + 1
    assert calls["listdir"] == 1


def test_the_read_by_name_equals_a_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    with placed_sockets([600, 601, 650]) as placed:
        wanted = socket_links(placed.values())
        by_name = wanted_sockets_in(FD_DIR, wanted, counted=True)
        by_listing = wanted_sockets_in(FD_DIR, wanted)
    assert sorted(by_name) == sorted(by_listing)
    assert sorted(by_name) == sorted((inode, str(fd)) for fd, inode in placed.items())


def test_ranked_reads_the_likeliest_then_the_smaller_tables_then_lower_pids() -> None:
    rank = {10: 1, 11: 0, 12: 0, 13: 0, 14: 0}.__getitem__
    size = {10: 1, 11: 17, 12: 5, 13: 5, 14: 17}.__getitem__  # fd-count bit lengths
    assert ranked([14, 13, 12, 11, 10], rank, size) == [12, 13, 11, 14, 10]
    assert ranked([14, 13, 12, 11, 10], rank, None) == [11, 12, 13, 14, 10]


def test_scan_order_puts_a_small_holder_before_a_big_table_of_the_same_rank(
    tmp_path: Path,
) -> None:
    # Process 5 (lower pid) holds 100,000 fds, process 9 a few: with the tables' sizes known,
    # 9 is read first, so a walk whose wanted sockets are all in 9 never reads 5.
    paths = build_proc(tmp_path, {5: ("big", {3: "socket:[1]"}), 9: ("nginx", {3: "socket:[2]"})})
    sizes: dict[int, int] = {5: 100_000, 9: 40}
    size_class: Callable[[int], int] = lambda pid: sizes[pid].bit_length()  # noqa: E731
    assert _scan_order(paths, frozenset(), frozenset(), size_class) == [9, 5]
    assert _scan_order(paths, frozenset(), frozenset()) == [5, 9]
