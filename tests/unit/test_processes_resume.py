"""A walk cut by its deadline carries on where it stopped at the next scan (issue: at 1M sockets
each poll re-read the same processes into the same deadline and never found the rest)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tcpwatch.model import Attribution, ProcessRef
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.processes import resume_order, scan_owners
from tests.unit.test_processes import build_proc

PIDS = tuple(range(10, 20))  # each pid holds socket pid * 10 at fd 3, among other fds


def ticking_clock() -> Callable[[], float]:
    """One second per reading: scan_owners reads the clock once to set its deadline, then once
    before each process, so a deadline of N.5 s lets a walk read N processes."""
    ticks = itertools.count()
    return lambda: float(next(ticks))


def populate(tmp_path: Path) -> ProcPaths:
    return build_proc(
        tmp_path,
        {pid: ("app", {0: "pipe:[1]", 3: f"socket:[{pid * 10}]", 4: "/dev/null"}) for pid in PIDS},
    )


def test_resume_order_reads_the_unread_first() -> None:
    assert resume_order([3, 1, 2, 5], set()) == [3, 1, 2, 5]
    assert resume_order([3, 1, 2, 5], {3, 2, 9}) == [1, 5, 3, 2]


def test_a_cut_walk_resumes_and_completes_with_one_walks_work(tmp_path: Path) -> None:
    paths = populate(tmp_path)
    wanted = frozenset(pid * 10 for pid in PIDS)

    first = scan_owners(paths, wanted, deadline_seconds=5.5, clock=ticking_clock())
    assert not first.complete
    assert first.processes_scanned == 5
    assert set(first.owners) == {100, 110, 120, 130, 140}
    assert first.walked == frozenset(PIDS[:5])

    second = scan_owners(paths, wanted, deadline_seconds=5.5, clock=ticking_clock(), known=first)
    assert second.complete
    assert second.owners == {pid * 10: ProcessRef(pid, "app") for pid in PIDS}
    assert second.confirmed == 5  # the first walk's owners, re-checked with one readlink each
    # The two walks together read each process once: one full walk's work.
    assert first.processes_scanned + second.processes_scanned == len(PIDS)
    assert second.walked == frozenset()  # not cut: the next walk starts afresh

    # Without the resume, the second walk re-reads the same five processes and finds nothing.
    restarted = scan_owners(
        paths, wanted, 5.5, clock=ticking_clock(), known=replace(first, walked=frozenset())
    )
    assert not restarted.complete
    assert set(restarted.owners) == set(first.owners)


def test_walks_cut_every_poll_still_converge(tmp_path: Path) -> None:
    paths = populate(tmp_path)
    wanted = frozenset(pid * 10 for pid in PIDS)
    known: Attribution | None = None
    history: list[tuple[int, int, bool]] = []
    for _ in range(4):
        known = scan_owners(paths, wanted, 3.5, clock=ticking_clock(), known=known)
        history.append((known.processes_scanned, len(known.owners), known.complete))
    # 3 processes a walk: 3, 6, 9 owners, then the last one; every process read once.
    assert history == [(3, 3, False), (3, 6, False), (3, 9, False), (1, 10, True)]


def test_a_gone_process_loses_its_owner_and_a_new_one_is_read_first(tmp_path: Path) -> None:
    paths = populate(tmp_path)
    wanted = frozenset(pid * 10 for pid in PIDS)
    first = scan_owners(paths, wanted, 5.5, clock=ticking_clock())
    assert first.owners[120] == ProcessRef(12, "app")
    # Process 12 exits (its socket 120 is gone with it)...
    shutil.rmtree(tmp_path / "12")
    # ... and a new process 5 (a lower pid: first in a fresh walk) opens socket 50.
    build_proc(tmp_path / "new", {5: ("late", {3: "socket:[50]"})})
    shutil.move(tmp_path / "new" / "5", tmp_path / "5")
    shutil.rmtree(tmp_path / "new")
    wanted_now = (wanted - {120}) | {50}

    second = scan_owners(paths, wanted_now | {120}, 20.5, clock=ticking_clock(), known=first)
    assert 120 not in second.owners  # never the owner of a process that is gone
    assert second.owners[50] == ProcessRef(5, "late")
    assert set(second.owners) == wanted_now
    # 120 has no owner, so the walk read every process: the unread (and new) first, then the rest.
    assert second.complete
    assert second.processes_scanned == 10  # the 9 left of the first 10, and the new one


def test_a_walk_cut_past_the_unread_starts_a_new_round(tmp_path: Path) -> None:
    paths = populate(tmp_path)
    nobody = 7  # a socket no process holds: no walk stops early
    first = scan_owners(paths, frozenset({nobody}), 8.5, clock=ticking_clock())
    assert first.walked == frozenset(PIDS[:8])
    # 18 and 19 first, then 10..15: the round wraps, and only this walk's reads are behind it.
    second = scan_owners(paths, frozenset({nobody}), 8.5, clock=ticking_clock(), known=first)
    assert second.walked == frozenset({18, 19, *PIDS[:6]})
    # 16 and 17 (the last unread) first, then the read ones in their usual order.
    third = scan_owners(paths, frozenset({nobody}), 8.5, clock=ticking_clock(), known=second)
    assert third.walked == frozenset({16, 17, *PIDS[:6]})
    assert not third.complete
