"""Held /proc/sys descriptors (heldfiles.py) in real namespaces: one opened in a namespace keeps
reading that namespace's values from any thread, and once the namespace is gone it fails, so the
file is opened afresh instead of an old value being returned."""

from __future__ import annotations

import os
import time

import pytest

from tcpwatch.paths import read_small_text
from tcpwatch.sources.heldfiles import HeldFiles
from tcpwatch.sources.netns.discovery import NetnsTarget
from tcpwatch.sources.netns.entering import run_inside

from .netns import Netns

pytestmark = pytest.mark.integration

FIN_TIMEOUT = "/proc/sys/net/ipv4/tcp_fin_timeout"


def test_a_held_descriptor_reads_its_namespace_and_fails_once_it_is_gone() -> None:
    host_value = read_small_text(FIN_TIMEOUT, 4096)
    wanted = "33" if host_value.strip() != "33" else "34"
    held = HeldFiles()
    try:
        ns = Netns()
        with ns:
            ns.sysctl("net.ipv4.tcp_fin_timeout", wanted)
            path = f"/run/netns/{ns.name}"
            inode = os.stat(path).st_ino
            target = NetnsTarget(name=ns.name, inode=inode, path=path)
            # Opened by a thread inside the namespace, as a poll of it does.
            assert run_inside(target, lambda: held.read(inode, FIN_TIMEOUT, 4096)) == f"{wanted}\n"
            # Read from this thread (the host's namespace): still the namespace's value.
            assert held.read(inode, FIN_TIMEOUT, 4096) == f"{wanted}\n"
            ns.sysctl("net.ipv4.tcp_fin_timeout", "41")
            assert held.read(inode, FIN_TIMEOUT, 4096) == "41\n"  # rendered afresh each read
            assert held.opens == 1
        # The namespace is deleted; the kernel tears it down asynchronously. Until then a read
        # still gives its own value; afterwards the held descriptor fails and the file is opened
        # again by this thread, which reads the host's value: never the namespace's old one.
        deadline = time.monotonic() + 20.0
        text = held.read(inode, FIN_TIMEOUT, 4096)
        while held.opens == 1 and time.monotonic() < deadline:
            assert text == "41\n"
            time.sleep(0.05)
            text = held.read(inode, FIN_TIMEOUT, 4096)
        assert held.opens == 2, "the held descriptor still read 20 s after the namespace went"
        assert text == host_value
    finally:
        held.close()
