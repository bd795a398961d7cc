"""The owners source: which owners are described, and what psutil (or /proc/PID/limits) says.

The descriptions are of real processes (this test's own and a child it starts), compared with
what the kernel reports for them through /proc and getrlimit.
"""

from __future__ import annotations

import os
import pwd
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from tcpwatch.model import ProcessRef
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.owners import (
    Interest,
    describe_owners,
    owners_of_interest,
    parse_nofile_limits,
)
from tests.unit.snapshots import listener, snapshot, socket_table

NGINX = ProcessRef(10, "nginx")
APP = ProcessRef(11, "app")
LEAKY = ProcessRef(12, "leaky")


def test_listeners_owners_come_first_then_the_top_close_wait_holders() -> None:
    table = socket_table(
        [listener(80, inode=1), listener(443, inode=2), listener(9000, inode=3)],
        close_wait_inodes=range(100, 130),
    )
    owners = {1: NGINX, 2: NGINX, 3: APP}
    owners |= {inode: LEAKY for inode in range(100, 120)}
    owners |= {inode: APP for inode in range(120, 130)}
    other = snapshot(netns="ns2", sockets=socket_table([listener(80, inode=4)]), owners={4: APP})
    chosen = owners_of_interest([snapshot(sockets=table, owners=owners), other])
    # Most listeners first (a tie goes to the lower pid); APP's are in two namespaces.
    assert chosen == (
        Interest(NGINX, listeners=2, close_wait=0),
        Interest(APP, listeners=2, close_wait=10),
        Interest(LEAKY, listeners=0, close_wait=20),
    )


def test_the_choice_is_bounded() -> None:
    listeners = [listener(1000 + n, inode=n + 1) for n in range(40)]
    owners = {n + 1: ProcessRef(500 + n, f"p{n}") for n in range(40)}
    owners |= {inode: ProcessRef(900 + inode % 8, "holder") for inode in range(100, 180)}
    table = socket_table(listeners, close_wait_inodes=range(100, 180))
    chosen = owners_of_interest([snapshot(sockets=table, owners=owners)], 32, 5)
    assert len(chosen) == 32 + 5
    assert all(item.listeners == 1 for item in chosen[:32])
    assert all(item.close_wait == 10 for item in chosen[32:])


def test_nothing_to_describe_without_sockets_or_attribution() -> None:
    assert owners_of_interest([snapshot(owners=None), snapshot(sockets=None)]) == ()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "Max open files            1024                 524288               files",
            (1024, 524288),
        ),
        ("Max open files            unlimited            unlimited            files", (None, None)),
    ],
)
def test_parse_nofile_limits(line: str, expected: tuple[int | None, int | None]) -> None:
    text = f"Limit                     Soft Limit           Hard Limit           Units\n{line}\n"
    assert parse_nofile_limits(text) == expected


@pytest.mark.parametrize(
    "text", ["Max processes 10 10 processes\n", "Max open files            many  1024  files\n"]
)
def test_parse_nofile_limits_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="/proc/7/limits"):
        parse_nofile_limits(text, "/proc/7/limits")


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    """A process holding 50 more descriptors, with its soft limit lowered to 200."""
    code = (
        "import os, resource, time\n"
        "fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(7)[1]))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def test_a_real_process_is_described_as_the_kernel_sees_it(
    child: subprocess.Popen[str],
) -> None:
    item = Interest(ProcessRef(child.pid, "python3"), listeners=1, close_wait=0)
    described = describe_owners([item], ProcPaths())
    assert (described.wanted, described.failed, described.skipped) == (1, 0, "")
    process = described.processes[child.pid]
    assert process.open_fds == len(os.listdir(f"/proc/{child.pid}/fd"))
    assert process.open_fds >= 50
    hard = resource.prlimit(child.pid, resource.RLIMIT_NOFILE)[1]
    assert (process.max_fds, process.max_fds_hard) == (200, None if hard < 0 else hard)
    assert process.user == pwd.getpwuid(os.getuid()).pw_name
    assert time.time() - 60 < process.started_at <= time.time()
    assert (process.name, process.listeners) == ("python3", 1)


def test_refused_prlimit_falls_back_to_proc_limits(
    child: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's limit needs CAP_SYS_RESOURCE for prlimit(2); /proc/PID/limits is
    world-readable."""

    def refused(self: psutil.Process, *args: object) -> tuple[int, int]:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "rlimit", refused)
    item = Interest(ProcessRef(child.pid, "python3"), listeners=1, close_wait=0)
    process = describe_owners([item], ProcPaths()).processes[child.pid]
    with open(f"/proc/{child.pid}/limits", encoding="ascii") as limits:
        assert process.max_fds == 200 and parse_nofile_limits(limits.read())[0] == 200


def test_an_exited_owner_is_counted_not_raised() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    item = Interest(ProcessRef(int(gone.stdout), "python3"), listeners=1, close_wait=0)
    described = describe_owners([item], ProcPaths())
    assert (described.processes, described.wanted, described.failed) == ({}, 1, 1)


def test_another_procfs_is_not_described() -> None:
    """psutil reads /proc: pids under another procfs root need not be ours."""
    item = Interest(ProcessRef(os.getpid(), "python3"), listeners=1, close_wait=0)
    described = describe_owners([item], ProcPaths(root="/host/proc"))
    assert described.processes == {} and described.wanted == 1
    assert "/host/proc" in described.skipped


def test_descriptors_are_counted_from_the_fd_directory_size() -> None:
    import os

    from tcpwatch.paths import ProcPaths
    from tcpwatch.sources.owners import _count_fds

    before = _count_fds(ProcPaths(), os.getpid())
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    try:
        # Linux 6.2+ reports the count as the directory's size: 20 more, without a listing.
        assert _count_fds(ProcPaths(), os.getpid()) == before + 20
    finally:
        for fd in opened:
            os.close(fd)
    assert _count_fds(ProcPaths(), 2**22 + 7) == 0  # no such process: the caller falls back
