"""Held /proc/net descriptors (procnet.py) in real namespaces: a pread at 0 renders the table
afresh, and, since such a descriptor holds its namespace (fs/proc/proc_net.c,
``single_open_net``), a deleted namespace lives exactly as long as its descriptors are held:
the poll that no longer polls it closes them, and the kernel then tears it down."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.base import FileMemo
from tcpwatch.sources.netns.discovery import NetnsTarget
from tcpwatch.sources.netns.entering import run_inside
from tcpwatch.sources.procnet import read_counters, read_sockstat

from .netns import Netns

pytestmark = pytest.mark.integration

PATHS = ProcPaths(net_dir="thread-self/net")  # as a poll of an entered namespace reads them
# One connection on loopback, closed by the client first: it leaves a timewait socket.
ONE_CONNECTION = """
import socket, time
listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
client.close()
assert server.recv(1) == b""
server.close()
time.sleep(0.2)
"""


def _target(ns: Netns) -> NetnsTarget:
    path = f"/run/netns/{ns.name}"
    return NetnsTarget(name=ns.name, inode=os.stat(path).st_ino, path=path)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_held_table_is_rendered_afresh_and_reads_its_own_namespace() -> None:
    memo = FileMemo()
    try:
        with Netns() as ns:
            target = _target(ns)
            inode = target.inode
            counters = run_inside(target, lambda: read_counters(PATHS, memo, inode))
            sockstat = run_inside(target, lambda: read_sockstat(PATHS, memo, inode))
            opens = memo.held.opens
            assert memo.held.held == opens >= 3
            ns.run(sys.executable, "-c", ONE_CONNECTION)
            # Read from this thread (the host's namespace) through the held descriptors.
            now = read_counters(PATHS, memo, inode)
            stat_now = read_sockstat(PATHS, memo, inode)
            assert memo.held.opens == opens, "a table was opened again, not read from its fd"
            for name in ("TcpActiveOpens", "TcpPassiveOpens"):
                assert now.values[name] == counters.values[name] + 1, name
            assert sockstat.time_wait == 0 and stat_now.time_wait == 1
            # The namespace's own counters, not the host's: nstat inside it agrees.
            assert ns.nstat()["TcpActiveOpens"] == now.values["TcpActiveOpens"]
    finally:
        memo.held.close()


def _has_link(ns: Netns, name: str) -> bool:
    argv = ["ip", "-n", ns.name, "link", "show", name]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


def test_a_deleted_namespace_is_held_until_the_poll_without_it_closes_its_tables() -> None:
    """A veth pair has one end in the polled namespace and its peer in a witness namespace: the
    peer goes when the kernel tears the polled namespace down (its devices are unregistered)."""
    memo = FileMemo()
    try:
        with Netns() as witness:
            with Netns() as polled:
                link = ["ip", "-n", witness.name, "link", "add", "tw-witness", "type", "veth"]
                link += ["peer", "name", "tw-polled", "netns", polled.name]
                subprocess.run(link, capture_output=True, timeout=30, check=True)
                target = _target(polled)
                inode = target.inode
                run_inside(target, lambda: read_counters(PATHS, memo, inode))
                run_inside(target, lambda: read_sockstat(PATHS, memo, inode))
                memo.end_poll()  # the poll that read it ends: they stay held
                held, fds = memo.held.held, _open_fds()
                assert held >= 3
            # `ip netns del` has run: only the held descriptors keep the namespace. With nothing
            # held the witness's end went 0.01 s after `ip netns del` (by hand on 6.18).
            time.sleep(3.0)
            assert _has_link(witness, "tw-witness"), "torn down while its tables were held"
            memo.end_poll()  # a poll that did not poll it
            assert memo.held.held == 0 and _open_fds() == fds - held
            deadline = time.monotonic() + 60.0
            while _has_link(witness, "tw-witness") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _has_link(witness, "tw-witness"), "still there 60 s after the close"
    finally:
        memo.held.close()
