"""KnownOwners: an owner described again reads only what can change (uid, fds, limit) and keeps
its start time only while the very process it was read from lives.

Real child processes: one that changes its uid, fd count and limit between two descriptions, one
that exits, and a pid whose kept entry belongs to a process that exited (as when the pid is
reused: the entry is moved under a live process' pid, since a test cannot make the kernel hand a
pid out again).
"""

from __future__ import annotations

import os
import pwd
import resource
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from tcpwatch.model import ProcessRef
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.owner_memo import KnownOwners, real_uid
from tcpwatch.sources.owners import Interest, describe, describe_owners

# Opens 10 files, then on each line from stdin: "fds" opens 10 more, "setuid" drops to nobody.
CHILD = """
import os, sys
held = [open(os.devnull) for _ in range(10)]
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "fds":
        held += [open(os.devnull) for _ in range(10)]
    elif line.strip() == "setuid":
        os.setuid(65534)
    print("done", flush=True)
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def _tell(process: subprocess.Popen[str], what: str) -> None:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(what + "\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "done"


def _item(pid: int) -> Interest:
    return Interest(ProcessRef(pid, "python3"), listeners=1, close_wait=0)


def test_a_kept_owner_is_described_as_a_fresh_psutil_reading(
    child: subprocess.Popen[str],
) -> None:
    known = KnownOwners()
    try:
        first = describe(_item(child.pid), ProcPaths(), known)
        assert len(known) == 1
        assert describe(_item(child.pid), ProcPaths(), known) == first
        # What can change while the process lives is read again.
        _tell(child, "fds")
        resource.prlimit(child.pid, resource.RLIMIT_NOFILE, (300, 400))
        if os.getuid() == 0:
            _tell(child, "setuid")
        again = describe(_item(child.pid), ProcPaths(), known)
        assert again == describe(_item(child.pid), ProcPaths())  # as without the memo
        assert again.open_fds == first.open_fds + 10
        assert (again.max_fds, again.max_fds_hard) == (300, 400)
        if os.getuid() == 0:
            assert first.user == "root" and again.user == pwd.getpwuid(65534).pw_name
        assert again.started_at == first.started_at
    finally:
        known.close()


def test_an_owner_that_exited_is_dropped_and_counted_failed(
    child: subprocess.Popen[str],
) -> None:
    known = KnownOwners()
    try:
        describe_owners([_item(child.pid)], ProcPaths(), known)
        child.kill()
        child.wait(timeout=10)
        described = describe_owners([_item(child.pid)], ProcPaths(), known)
        assert (described.processes, described.failed) == ({}, 1)
        assert len(known) == 0
    finally:
        known.close()


def test_a_pid_whose_kept_process_exited_is_described_afresh(
    child: subprocess.Popen[str],
) -> None:
    """A reused pid: the kept entry's process (the child) has exited, and the pid now names
    another live process (this test's own). Its start time must be its own, not the child's."""
    known = KnownOwners()
    try:
        describe(_item(child.pid), ProcPaths(), known)
        child.kill()
        child.wait(timeout=10)
        me = os.getpid()
        known._kept[me] = known._kept.pop(child.pid)  # the pid handed to another process
        described = describe(_item(me), ProcPaths(), known)
        assert described.started_at == psutil.Process(me).create_time()
        assert described == describe(_item(me), ProcPaths())
    finally:
        known.close()


def test_entries_are_made_afresh_when_old_and_forgotten_when_not_wanted(
    child: subprocess.Popen[str],
) -> None:
    now = [0.0]
    known = KnownOwners(clock=lambda: now[0], max_age=60.0)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        describe(_item(child.pid), ProcPaths(), known)
        kept = known.get(child.pid)
        now[0] = 59.0
        assert known.get(child.pid) is kept
        now[0] = 60.0
        assert known.get(child.pid) is None and len(known) == 0  # a renamed user shows
        describe_owners([_item(child.pid), _item(os.getpid())], ProcPaths(), known)
        assert len(known) == 2 and len(os.listdir("/proc/self/fd")) == fds + 2  # pidfds
        describe_owners([_item(os.getpid())], ProcPaths(), known)
        assert len(known) == 1 and len(os.listdir("/proc/self/fd")) == fds + 1
    finally:
        known.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_the_real_uid_is_the_first_of_the_status_uids() -> None:
    status = b"Name:\t\xff odd\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t0\t0\t0\n"
    assert real_uid(status) == 1000
    with open("/proc/self/status", "rb") as own:
        assert real_uid(own.read()) == os.getuid()
