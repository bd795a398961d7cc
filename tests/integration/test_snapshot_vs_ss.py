"""tcpwatch's snapshot against ``ss`` and ``nstat``, on known populations in throw-away namespaces.

For each population (one kind per namespace, every kind together, and two port-range variants),
one quiet window is found in which ``ss -tanHep``, ``ss -ltnHe`` and ``nstat -asz`` read the same
before and after tcpwatch took two snapshots there, one per ESTABLISHED method. Every test then
compares a part of those snapshots with what ss and nstat printed in that window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tcpwatch.model import FAMILIES, STATES

from . import populations
from .netns import (
    KERNEL_COUNTER_METRICS,
    Netns,
    Observation,
    SsSocket,
    observe,
    parse_ss,
    take_snapshots,
)
from .populations import Population

pytestmark = pytest.mark.integration

METHODS = ("derived", "dumped")
EXPORTED_COUNTERS = tuple(KERNEL_COUNTER_METRICS)
# ss states that hold a 4-tuple, so a local port: what per-destination port use counts.
TUPLE_STATES = frozenset(STATES) - {"syn_recv", "close", "listen"}
LISTENER_IN_RANGE_PORT = 40000  # inside the default ip_local_port_range 32768-60999


def _narrowed_port_range(ns: Netns) -> list[Population]:
    """Outbound sockets on both sides of a narrowed range whose ends are live ESTABLISHED ports.

    The range is narrowed after the connections exist, so part of each kind falls outside it and
    the kernel-side bytecode filter, with both of its inclusive bounds, decides what is dumped.
    """
    built = [
        populations.established(ns, pairs=30, port=20021),
        populations.time_wait(ns, count=20, port=20022, closer="client"),
        populations.syn_sent(ns, count=6, port=20023),
        populations.established(ns, pairs=10, port=20024, address="::1"),
    ]
    client_ports = sorted(
        sock.local_port
        for sock in parse_ss(ns.ss("-tanH", "-4"))
        if sock.state == "established" and sock.peer_port == 20021
    )
    assert len(client_ports) == 30, f"expected 30 client ports, ss shows {client_ports}"
    low, high = client_ports[7], client_ports[22]
    assert 32768 <= low < high, f"client ports {client_ports} are not ephemeral"
    ns.sysctl("net.ipv4.ip_local_port_range", f"{low} {high}")
    return built


def _listener_in_port_range(ns: Netns) -> list[Population]:
    """A service listening inside ip_local_port_range: its inbound side is not ephemeral use."""
    return [
        populations.established(ns, pairs=20, port=LISTENER_IN_RANGE_PORT),
        populations.time_wait(ns, count=10, port=LISTENER_IN_RANGE_PORT + 1, closer="server"),
    ]


def _standard(kind: str) -> Callable[[Netns], list[Population]]:
    return lambda ns: [populations.standard(ns, kind)]


RECIPES: Mapping[str, Callable[[Netns], list[Population]]] = {
    **{kind: _standard(kind) for kind in populations.STANDARD_PORTS},
    "combined": populations.standard_set,
    "narrowed_port_range": _narrowed_port_range,
    "listener_in_port_range": _listener_in_port_range,
}


@dataclass(frozen=True)
class Case:
    """One population and what tcpwatch, ss and nstat saw of it in one quiet window."""

    name: str
    netns: str
    built: list[Population]
    window: Observation[list[dict[str, Any]]]
    port_range: tuple[int, int]

    def snapshot(self, method: str) -> dict[str, Any]:
        return self.window.result[METHODS.index(method)]

    def sockets(self, method: str) -> dict[str, Any]:
        table: dict[str, Any] | None = self.snapshot(method)["sockets"]
        assert table is not None, f"sockdiag failed: {self.snapshot(method)['sources']}"
        return table

    def ss_all(self) -> list[tuple[str, SsSocket]]:
        return [(family, sock) for family in FAMILIES for sock in self.window.sockets[family]]


def settings(method: str) -> dict[str, Any]:
    # A generous fd-scan deadline: other tests' populations can make the host's fd tables huge,
    # and these tests judge what attribution finds, not how fast.
    return {"established": method, "process_scan_timeout": 120.0}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def case(request: pytest.FixtureRequest, integration_prerequisites: None) -> Iterator[Case]:
    name: str = request.param
    with Netns() as ns:
        built = RECIPES[name](ns)
        low, high = (int(word) for word in ns.read_sysctl("net.ipv4.ip_local_port_range").split())
        window = observe(
            ns,
            lambda: take_snapshots(ns, *(settings(method) for method in METHODS)),
            watched_counters=EXPORTED_COUNTERS,
        )
        yield Case(name, ns.name, built, window, (low, high))


def ss_state_counts(window: Observation[Any]) -> dict[str, dict[str, int]]:
    counts = {family: dict.fromkeys(STATES, 0) for family in FAMILIES}
    for family in FAMILIES:
        for sock in window.sockets[family]:
            counts[family][sock.state] += 1
    return counts


# -- the population is really there (so no comparison below can pass on an empty namespace) --


def test_population_is_what_the_builders_reported(case: Case) -> None:
    for population in case.built:
        port = population.info["port"]
        for side, states in population.info["sockets"].items():
            for state, count in states.items():
                seen = sum(
                    1
                    for _, sock in case.ss_all()
                    if sock.state == state
                    and (sock.local_port if side == "server" else sock.peer_port) == port
                )
                assert seen == count, (
                    f"{population.kind} on port {port}: ss shows {seen} {side} {state}, "
                    f"the builder made {count}"
                )


def test_accept_queue_overflows_are_counted_by_the_kernel(case: Case) -> None:
    full = [p for p in case.built if p.kind == "accept_queue_full"]
    counters = case.window.counters_before
    overflows = sum(p.info["overflows"] for p in full)
    # The namespace is fresh: its counters hold exactly what the builders caused.
    assert counters["TcpExtListenOverflows"] == overflows
    assert counters["TcpExtListenDrops"] >= overflows
    for population in full:
        assert population.info["overflows"] >= 3
        listener = next(
            sock
            for sock in case.window.listeners["ipv4"]
            if sock.local_port == population.info["port"]
        )
        backlog = population.info["backlog"]
        assert (listener.recv_q, listener.send_q) == (backlog + 1, backlog)


# -- tcpwatch against ss and nstat ----------------------------------------------------------------


def test_snapshot_names_the_namespace(case: Case) -> None:
    for method in METHODS:
        assert case.snapshot(method)["netns"] == case.netns


@pytest.mark.parametrize("method", METHODS)
def test_every_source_worked(case: Case, method: str) -> None:
    failed = [source for source in case.snapshot(method)["sources"] if not source["ok"]]
    assert failed == []


@pytest.mark.parametrize("method", METHODS)
def test_state_counts_match_ss(case: Case, method: str) -> None:
    table = case.sockets(method)
    assert table["established_method"] == method
    assert table["counts"] == ss_state_counts(case.window)


def test_established_methods_agree(case: Case) -> None:
    derived, dumped = (case.sockets(method) for method in METHODS)
    for part in (
        "counts",
        "listeners",
        "syn_sent",
        "self_connects",
        "inodes_by_state",
    ):
        assert derived[part] == dumped[part], part
    # Counts only: live tcp_info (RTT, retransmissions) comes with the derived method's
    # per-destination dump alone, and moves between the two snapshots anyway.
    counted = ("family", "source", "address", "port", "sockets", "time_wait")
    assert [{key: use[key] for key in counted} for use in derived["ephemeral_use"]] == [
        {key: use[key] for key in counted} for use in dumped["ephemeral_use"]
    ]


def _listener_rows(listeners: Sequence[Mapping[str, Any]]) -> dict[int, tuple[Any, ...]]:
    return {
        item["inode"]: (
            item["family"],
            item["address"],
            item["port"],
            item["queue_length"],
            item["queue_max"],
        )
        for item in listeners
    }


@pytest.mark.parametrize("method", METHODS)
def test_listener_queues_match_ss_lnt(case: Case, method: str) -> None:
    expected = {
        sock.inode: (family, sock.local_address, sock.local_port, sock.recv_q, sock.send_q)
        for family in FAMILIES
        for sock in case.window.listeners[family]
    }
    assert _listener_rows(case.sockets(method)["listeners"]) == expected


@pytest.mark.parametrize("method", METHODS)
def test_listener_syn_recv_matches_ss(case: Case, method: str) -> None:
    """Each listener's syn_recv is the SYN-RECV count on its port.

    Within a SO_REUSEPORT group the kernel does not say which socket holds a request socket;
    tcpwatch documents that the group's socket_index 0 carries them all.
    """
    listeners = case.sockets(method)["listeners"]
    endpoints_per_port: dict[int, set[tuple[str, str]]] = {}
    for item in listeners:
        endpoints_per_port.setdefault(item["port"], set()).add((item["family"], item["address"]))
    # The oracle below attributes by port, so each port must have one listening endpoint here.
    assert all(len(endpoints) == 1 for endpoints in endpoints_per_port.values())
    syn_recv_per_port = Counter(
        sock.local_port for _, sock in case.ss_all() if sock.state == "syn_recv"
    )
    got = {(item["port"], item["socket_index"]): item["syn_recv"] for item in listeners}
    expected = {
        (item["port"], item["socket_index"]): syn_recv_per_port[item["port"]]
        if item["socket_index"] == 0
        else 0
        for item in listeners
    }
    assert got == expected
    orphaned = set(syn_recv_per_port) - set(endpoints_per_port)
    assert not orphaned, f"SYN-RECV sockets on ports without a listener: {orphaned}"


@pytest.mark.parametrize("method", METHODS)
def test_ephemeral_use_matches_ss(case: Case, method: str) -> None:
    low, high = case.port_range
    listening_ports = {
        sock.local_port for family in FAMILIES for sock in case.window.listeners[family]
    }
    sockets: Counter[tuple[str, str, str, int | None]] = Counter()
    time_wait: Counter[tuple[str, str, str, int | None]] = Counter()
    for family, sock in case.ss_all():
        if (
            sock.state in TUPLE_STATES
            and low <= sock.local_port <= high
            and sock.local_port not in listening_ports
        ):
            key = (family, sock.local_address, sock.peer_address, sock.peer_port)
            sockets[key] += 1
            time_wait[key] += sock.state == "time_wait"
    expected = {key: (count, time_wait[key]) for key, count in sockets.items()}
    got = {
        (use["family"], use["source"], use["address"], use["port"]): (
            use["sockets"],
            use["time_wait"],
        )
        for use in case.sockets(method)["ephemeral_use"]
    }
    assert got == expected
    counts = [use["sockets"] for use in case.sockets(method)["ephemeral_use"]]
    assert counts == sorted(counts, reverse=True), "ephemeral_use must be largest first"


@pytest.mark.parametrize("method", METHODS)
def test_syn_sent_destinations_and_self_connects_match_ss(case: Case, method: str) -> None:
    expected = Counter(
        (family, sock.peer_address, sock.peer_port)
        for family, sock in case.ss_all()
        if sock.state == "syn_sent"
    )
    table = case.sockets(method)
    got = {(d["family"], d["address"], d["port"]): d["sockets"] for d in table["syn_sent"]}
    assert got == dict(expected)
    self_connected = sorted(
        (family, sock.local_address, sock.local_port, sock.state)
        for family, sock in case.ss_all()
        if (sock.local_address, sock.local_port) == (sock.peer_address, sock.peer_port)
    )
    got_self = sorted(
        (item["family"], item["address"], item["port"], item["state"])
        for item in table["self_connects"]
    )
    assert got_self == self_connected


@pytest.mark.parametrize("method", METHODS)
def test_counters_match_nstat(case: Case, method: str) -> None:
    counters = case.snapshot(method)["counters"]
    assert counters is not None
    values: dict[str, int] = counters["values"]
    before, after = case.window.counters_before, case.window.counters_after
    # Exported counters stood still over the window: tcpwatch must read exactly nstat's value.
    assert {name: values.get(name) for name in EXPORTED_COUNTERS} == {
        name: before[name] for name in EXPORTED_COUNTERS
    }
    # Every other counter both read lies between nstat's reads around the snapshot.
    common = set(values) & set(before) & set(after)
    assert len(common) > 100, f"only {len(common)} counter names in common with nstat"
    outside = {
        name: (before[name], values[name], after[name])
        for name in sorted(common)
        if not min(before[name], after[name]) <= values[name] <= max(before[name], after[name])
    }
    assert outside == {}


@pytest.mark.parametrize("method", METHODS)
def test_sockstat_matches_ss(case: Case, method: str) -> None:
    """sockstat ``tw`` counts timewait sockets, ``inuse`` full ones (ss marks their shutdown)."""
    sockstat = case.snapshot(method)["sockstat"]
    assert sockstat is not None
    expected = {
        "time_wait": sum(1 for _, sock in case.ss_all() if sock.timewait),
        "inuse_ipv4": sum(1 for sock in case.window.sockets["ipv4"] if sock.full_socket),
        "inuse_ipv6": sum(1 for sock in case.window.sockets["ipv6"] if sock.full_socket),
    }
    assert {name: sockstat[name] for name in expected} == expected


def test_attribution_matches_ss_p(case: Case) -> None:
    """Listeners and CLOSE_WAIT sockets are attributed to the process ss -p names."""
    table = case.sockets("derived")
    ss_close_wait = {sock.inode for _, sock in case.ss_all() if sock.state == "close_wait"}
    assert set(table["inodes_by_state"]["close_wait"]) == ss_close_wait
    attribution = case.snapshot("derived")["attribution"]
    assert attribution is not None
    assert attribution["complete"], attribution
    owners: dict[str, dict[str, Any]] = attribution["owners"]
    wanted = [
        sock for _, sock in case.ss_all() if sock.state in ("listen", "close_wait") and sock.inode
    ]
    got = {}
    expected = {}
    for sock in wanted:
        owner = owners.get(str(sock.inode))
        got[sock.inode] = None if owner is None else (owner["name"], owner["pid"])
        candidates = sorted((process.name, process.pid) for process in sock.processes)
        # A socket shared by several processes may go to any of them; ss lists them all.
        expected[sock.inode] = got[sock.inode] if got[sock.inode] in candidates else candidates
    assert got == expected
    for population in case.built:
        if population.kind == "close_wait":
            for inode in population.info["close_wait_inodes"]:
                assert owners[str(inode)] == {
                    "pid": population.info["pid"],
                    "name": population.info["process_name"],
                }
