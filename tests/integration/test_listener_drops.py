"""Drops per listener against the real kernel: sk_drops from INET_DIAG_SKMEMINFO, exact against
`ss -ltnm` (its d<N>) and against nstat's ListenDrops in the same namespace.

A helper holds two listeners that never accept (backlog 1): each gets a known number of
non-blocking connects, of which all but the first two overflow the accept queue and are dropped.
The clients still in SYN_SENT are then closed, so no SYN retry moves the counters afterwards.
A third listener drops nothing.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from .netns import Netns, run_tcpwatch, take_snapshots
from .test_serve import matching, parse_samples

pytestmark = pytest.mark.integration

PORTS = {21001: 12, 21002: 30, 21003: 0}  # listener port -> connects beyond what it holds

_HELPER = r"""
import json, socket, sys, time
plan = {int(port): extra for port, extra in json.loads(sys.argv[1]).items()}
listeners, clients = [], []
for port in plan:
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(1)  # holds 2 completed connections (the kernel's > test), drops the rest
    listeners.append(listener)
for port, extra in plan.items():
    for _ in range(2 + extra if extra else 0):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        clients.append(client)
        time.sleep(0.005)
time.sleep(0.3)
for client in clients:  # SYN_SENT ones would retry; the established two stay queued
    try:
        client.getpeername()
    except OSError:
        client.close()
print("ready", flush=True)
time.sleep(120)
"""


def ss_drops(ns: Netns) -> dict[int, int]:
    """Listener port -> d<N> from `ss -ltnHm`."""
    text = ns.ss("-ltnHm")
    found: dict[int, int] = {}
    port = None
    for line in text.splitlines():
        listening = re.match(r"\s*LISTEN\s+\d+\s+\d+\s+\S+:(\d+)\s", line)
        if listening:
            port = int(listening.group(1))
        drops = re.search(r"\bd(\d+)\)", line)
        if drops and port is not None:
            found[port] = int(drops.group(1))
    return found


def test_listener_drops_match_ss_and_nstat(netns: Netns) -> None:
    helper = netns.spawn([sys.executable, "-c", _HELPER, json.dumps(PORTS)], lifetime=150)
    assert netns.read_line(helper, timeout=30) == "ready", netns.stderr_of(helper)
    before = ss_drops(netns)
    (snapshot,) = take_snapshots(netns, {})
    after = ss_drops(netns)
    assert before == after, "the listeners' drop counters moved during the measurement"
    drops = {lsn["port"]: lsn["drops"] for lsn in snapshot["sockets"]["listeners"]}
    assert drops == after
    # Every connect beyond the two queued ones was dropped, and nothing else was.
    assert drops == {port: extra for port, extra in PORTS.items()}
    counters = netns.nstat()
    assert counters["TcpExtListenDrops"] == sum(PORTS.values())
    assert counters["TcpExtListenOverflows"] == sum(PORTS.values())
    # The exported counter says the same, per listener.
    exposition = run_tcpwatch(netns, "metrics")
    assert exposition.returncode == 0, exposition.stderr
    samples = matching(parse_samples(exposition.stdout), "tcpwatch_listener_drops_total")
    assert {int(dict(labels)["port"]): value for labels, value in samples.items()} == after
