"""procnet and sysctl readers against the real kernel, inside throw-away namespaces.

Our readers run inside the namespace (``ip netns exec NAME python -c ...``) and are compared with
what nstat, ss and sysctl report there, on a small known population held by a helper process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcpwatch.sources.sysctl import SYSCTLS
from tests.integration.netns import Netns, parse_ss

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
ENVIRONMENT = {**os.environ, "PYTHONPATH": REPO}
# Values nstat leaves out as "useless" (not counters); we keep them.
NSTAT_SKIPS = {
    "IpForwarding",
    "IpDefaultTTL",
    "TcpRtoAlgorithm",
    "TcpRtoMin",
    "TcpRtoMax",
    "TcpMaxConn",
    "TcpCurrEstab",
}

READER = """
import dataclasses, json, sys
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.procnet import read_counters, read_sockstat
from tcpwatch.sources.sysctl import read_sysctls
paths = ProcPaths()
sysctls = read_sysctls(paths)
json.dump(
    {
        "counters": dict(read_counters(paths).values),
        "sockstat": dataclasses.asdict(read_sockstat(paths)),
        "sysctls": {name: list(fields) for name, fields in sysctls.values.items()},
        "reserved_ports": [list(pair) for pair in sysctls.reserved_ports],
    },
    sys.stdout,
)
"""

# Holds, on loopback: IPv4 listener + 3 ESTABLISHED pairs + a CLOSE_WAIT/FIN_WAIT2 pair (the
# client shut down its side but keeps the socket), IPv6 listener + 2 ESTABLISHED pairs, and 2
# client-side TIME_WAIT sockets (client closed first). 8 active and 8 passive opens in all.
POPULATION = """
import socket, time

def pair(listener, family):
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(listener.getsockname()[:2])
    server, _ = listener.accept()
    return client, server

keep = []
listener4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener4.bind(("127.0.0.1", 0))
listener4.listen(16)
listener6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener6.bind(("::1", 0))
listener6.listen(16)
keep += [listener4, listener6]
for _ in range(3):
    keep += pair(listener4, socket.AF_INET)
for _ in range(2):
    keep += pair(listener6, socket.AF_INET6)
for _ in range(2):
    client, server = pair(listener4, socket.AF_INET)
    client.close()
    assert server.recv(1) == b""
    server.close()
client, server = pair(listener4, socket.AF_INET)
client.shutdown(socket.SHUT_WR)
keep += [client, server]
print("ready", flush=True)
time.sleep(600)
"""


def read_ours(ns: Netns) -> dict[str, Any]:
    result = ns.run(sys.executable, "-c", READER, env=ENVIRONMENT, cwd=REPO)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def nstat_without_ipv6(ns: Netns, scratch: Path) -> dict[str, int]:
    """nstat's view of the namespace's netstat and snmp (snmp6 pointed at an empty file)."""
    environment = {
        **os.environ,
        "PROC_NET_SNMP6": os.devnull,
        "NSTAT_HISTORY": str(scratch / "nstat.history"),
    }
    result = ns.run("nstat", "--json", "-a", "-s", "-z", env=environment)
    counters: dict[str, int] = json.loads(result.stdout)["kernel"]
    return counters


def settled_sockets(ns: Netns) -> str:
    """``ss -tanHe`` once the closes have finished: 2 TIME-WAIT, 1 CLOSE-WAIT, no LAST-ACK."""
    deadline = time.monotonic() + 10
    while True:
        text = ns.ss("-tanHe")
        states = [socket.state for socket in parse_ss(text)]
        if (
            states.count("time_wait") == 2
            and states.count("close_wait") == 1
            and "last_ack" not in states
            and "fin_wait1" not in states
        ):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"population did not settle within 10 s:\n{text}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def populated() -> Iterator[Netns]:
    with Netns() as ns:
        helper = ns.spawn([sys.executable, "-c", POPULATION], lifetime=240)
        assert ns.read_line(helper, timeout=20) == "ready", ns.stderr_of(helper)
        settled_sockets(ns)
        yield ns


def test_counters_match_nstat(populated: Netns, tmp_path: Path) -> None:
    # Delayed ACKs may still move a counter: compare only between two identical reads of ours.
    for _ in range(20):
        before = read_ours(populated)["counters"]
        from_nstat = nstat_without_ipv6(populated, tmp_path)
        after = read_ours(populated)["counters"]
        if before == after:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the namespace's counters kept moving for 20 rounds")
    assert set(before) - set(from_nstat) == NSTAT_SKIPS
    assert set(from_nstat) <= set(before)
    assert {name: before[name] for name in from_nstat} == from_nstat
    # The population's own traffic, counted in this namespace only.
    assert before["TcpActiveOpens"] == 8
    assert before["TcpPassiveOpens"] == 8
    assert before["TcpCurrEstab"] == 11  # 10 ESTABLISHED + 1 CLOSE_WAIT
    assert before["TcpMaxConn"] == -1
    assert before["TcpExtListenOverflows"] == 0
    assert before["IpExtInOctets"] > 0


def test_sockstat_matches_ss(populated: Netns) -> None:
    sockets = parse_ss(settled_sockets(populated))
    sockstat = read_ours(populated)["sockstat"]
    ipv4 = [s for s in sockets if ":" not in s.local_address]
    ipv6 = [s for s in sockets if ":" in s.local_address]
    # inuse counts full sockets (ss -e marks them with a shutdown arrow); tw the timewait ones.
    assert sockstat["inuse_ipv4"] == sum(1 for s in ipv4 if s.full_socket) == 9
    assert sockstat["inuse_ipv6"] == sum(1 for s in ipv6 if s.full_socket) == 5
    assert sockstat["time_wait"] == sum(1 for s in sockets if s.timewait) == 2
    established = sum(1 for s in sockets if s.state in {"established", "close_wait"})
    assert read_ours(populated)["counters"]["TcpCurrEstab"] == established == 11


def test_sysctls_match_sysctl_tool() -> None:
    host_before = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    with Netns() as ns:
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 50001")
        ns.sysctl("net.ipv4.ip_local_reserved_ports", "40100,40200-40299")
        ns.sysctl("net.core.somaxconn", 512)
        ns.sysctl("net.ipv4.tcp_fin_timeout", 30)
        ours = read_ours(ns)
        existing = [
            name for name in SYSCTLS if ns.run("sysctl", "-n", name, check=False).returncode == 0
        ]
        expected = {
            name: [int(word) for word in ns.run("sysctl", "-n", name).stdout.split()]
            for name in existing
        }
    assert ours["sysctls"] == expected
    # Gone since 4.12, and host-wide ones that only the initial namespace shows: absent here.
    assert set(SYSCTLS) - set(ours["sysctls"]) == {
        "net.ipv4.tcp_tw_recycle",
        "net.core.netdev_max_backlog",
        "net.ipv4.tcp_max_orphans",
        "net.ipv4.tcp_mem",
    }
    assert ours["sysctls"]["net.ipv4.ip_local_port_range"] == [40000, 50001]
    assert ours["sysctls"]["net.core.somaxconn"] == [512]
    assert ours["sysctls"]["net.ipv4.tcp_fin_timeout"] == [30]
    assert ours["reserved_ports"] == [[40100, 40100], [40200, 40299]]
    assert Path("/proc/sys/net/ipv4/ip_local_port_range").read_text() == host_before
