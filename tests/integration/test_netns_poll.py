"""Polling several network namespaces at once, against ``ss`` and ``nstat`` run in each of them.

A fleet of throw-away namespaces, each with its own sysctls and population::

    saturated  net.core.somaxconn=128; a listener with listen(4) that never accepts (queue 5/4)
    healthy    net.core.somaxconn=8192, ip_local_port_range 40000-60999; ESTABLISHED and
               TIME_WAIT on loopback
    warned     net.core.somaxconn=128 and nothing else

plus namespaces made for one test: some removed or created between two polls, and one made by
``unshare --net`` that has no ``ip netns`` name. Only namespaces these tests made are selected
(by name or by a pattern only they match), so other tests' namespaces never change the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tcpwatch.config import CollectSettings
from tcpwatch.model import FAMILIES, STATES, Snapshot
from tcpwatch.paths import ProcPaths
from tcpwatch.snapshot import poll
from tcpwatch.sources import netns as netns_source

from . import populations
from .netns import REPO_ROOT, Netns, SsSocket, parse_ss, tcpwatch_env
from .populations import Population

pytestmark = pytest.mark.integration

FAMILY_FLAGS: Mapping[str, str] = {"ipv4": "-4", "ipv6": "-6"}
WATCHED_COUNTERS = ("TcpExtListenOverflows", "TcpExtListenDrops")
SATURATED_PORT = 20008
BACKLOG = 4
COMMAND_TIMEOUT = 180.0


@dataclass(frozen=True)
class Fleet:
    saturated: Netns
    healthy: Netns
    warned: Netns
    queue_full: Population
    serving: Population

    @property
    def members(self) -> tuple[Netns, ...]:
        return (self.saturated, self.healthy, self.warned)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(ns.name for ns in self.members)


@pytest.fixture(scope="module")
def fleet(integration_prerequisites: None) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        saturated, healthy, warned = (stack.enter_context(Netns()) for _ in range(3))
        saturated.sysctl("net.core.somaxconn", 128)
        queue_full = populations.accept_queue_full(
            saturated, port=SATURATED_PORT, backlog=BACKLOG, overflowing=3
        )
        healthy.sysctl("net.core.somaxconn", 8192)
        healthy.sysctl("net.ipv4.ip_local_port_range", "40000 60999")
        serving = populations.established(healthy, pairs=25, port=20001)
        populations.established(healthy, pairs=6, port=20002, address="::1")
        populations.time_wait(healthy, count=12, port=20003, closer="client")
        warned.sysctl("net.core.somaxconn", 128)
        yield Fleet(saturated, healthy, warned, queue_full, serving)


# -- what ss and nstat say in each namespace --------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One namespace through ``ss -tanH``, ``ss -lntH`` (per family) and ``nstat``."""

    sockets: Mapping[str, tuple[SsSocket, ...]]
    listeners: Mapping[str, tuple[SsSocket, ...]]
    counters: Mapping[str, int]

    def fingerprint(self) -> tuple[Any, ...]:
        return (
            {family: sorted(sock.key for sock in socks) for family, socks in self.sockets.items()},
            {f: sorted(sock.key for sock in socks) for f, socks in self.listeners.items()},
            dict(self.counters),
        )


def look(ns: Netns) -> Seen:
    counters = ns.nstat()
    return Seen(
        sockets={f: tuple(parse_ss(ns.ss("-tanH", flag))) for f, flag in FAMILY_FLAGS.items()},
        listeners={f: tuple(parse_ss(ns.ss("-lntH", flag))) for f, flag in FAMILY_FLAGS.items()},
        counters={name: counters.get(name, 0) for name in WATCHED_COUNTERS},
    )


def quiet_poll(
    namespaces: Sequence[Netns],
    measure: Callable[[], tuple[Snapshot, ...]],
    attempts: int = 10,
    budget: float = 120.0,
) -> tuple[dict[str, Snapshot], dict[str, Seen]]:
    """Poll between two identical ss/nstat readings of every namespace (timers move things)."""
    deadline = time.monotonic() + budget
    for _ in range(attempts):
        before = {ns.name: look(ns) for ns in namespaces}
        snapshots = measure()
        after = {ns.name: look(ns) for ns in namespaces}
        moved = [n for n in before if before[n].fingerprint() != after[n].fingerprint()]
        if not moved:
            polled = {snapshot.netns: snapshot for snapshot in snapshots}
            assert len(polled) == len(snapshots), f"two snapshots share a name: {snapshots}"
            return polled, before
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise AssertionError(f"namespaces {moved} never stood still around a poll")


def state_counts(seen: Seen, family: str) -> dict[str, int]:
    counted = Counter(sock.state for sock in seen.sockets[family])
    return {state: counted.get(state, 0) for state in STATES}


def listener_rows(snapshot: Snapshot, family: str) -> list[tuple[str, int, int, int]]:
    assert snapshot.sockets is not None, snapshot.sources
    return sorted(
        (lsn.address, lsn.port, lsn.queue_length, lsn.queue_max)
        for lsn in snapshot.sockets.listeners
        if lsn.family == family
    )


def ss_listener_rows(seen: Seen, family: str) -> list[tuple[str, int, int, int]]:
    return sorted(
        (sock.local_address, sock.local_port, sock.recv_q, sock.send_q)
        for sock in seen.listeners[family]
    )


def failed_sources(snapshots: Sequence[Snapshot]) -> list[str]:
    return [
        f"{snapshot.netns}: {status.name}: {status.error}"
        for snapshot in snapshots
        for status in snapshot.sources
        if not status.ok
    ]


def ip_netns_inode(name: str) -> int:
    return os.stat(os.path.join(netns_source.RUN_NETNS_DIR, name)).st_ino


# -- one poll, many namespaces ----------------------------------------------------------------


@pytest.fixture(scope="module")
def polled(fleet: Fleet) -> tuple[dict[str, Snapshot], dict[str, Seen]]:
    return quiet_poll(fleet.members, lambda: poll(CollectSettings(), fleet.names))


def test_each_namespace_is_reported_under_its_own_name(
    fleet: Fleet, polled: tuple[dict[str, Snapshot], dict[str, Seen]]
) -> None:
    snapshots, _ = polled
    assert sorted(snapshots) == sorted(fleet.names)
    assert failed_sources(list(snapshots.values())) == []
    for name, snapshot in snapshots.items():
        assert snapshot.identity.inode == ip_netns_inode(name)
        assert (snapshot.identity.container, snapshot.identity.pod) == ("", "")


def test_socket_counts_per_namespace_equal_ss_there(
    fleet: Fleet, polled: tuple[dict[str, Snapshot], dict[str, Seen]]
) -> None:
    snapshots, seen = polled
    for name in fleet.names:
        table = snapshots[name].sockets
        assert table is not None
        for family in FAMILIES:
            assert dict(table.counts[family]) == state_counts(seen[name], family), (name, family)
    healthy = snapshots[fleet.healthy.name].sockets
    assert healthy is not None
    # The populations really are there, and only in their own namespace.
    assert healthy.counts["ipv4"]["established"] == 2 * 25
    assert healthy.counts["ipv6"]["established"] == 2 * 6
    assert healthy.total("time_wait") == 12  # made moments ago; they last 60 s
    warned = snapshots[fleet.warned.name].sockets
    assert warned is not None and sum(warned.total(state) for state in STATES) == 0


def test_listeners_and_their_queues_per_namespace_equal_ss_lnt_there(
    fleet: Fleet, polled: tuple[dict[str, Snapshot], dict[str, Seen]]
) -> None:
    snapshots, seen = polled
    for name in fleet.names:
        for family in FAMILIES:
            assert listener_rows(snapshots[name], family) == ss_listener_rows(seen[name], family)
    saturated = listener_rows(snapshots[fleet.saturated.name], "ipv4")
    assert saturated == [("127.0.0.1", SATURATED_PORT, BACKLOG + 1, BACKLOG)]


def test_each_namespace_has_its_own_sysctls(
    fleet: Fleet, polled: tuple[dict[str, Snapshot], dict[str, Seen]]
) -> None:
    snapshots, _ = polled
    somaxconn: dict[str, int | None] = {}
    port_ranges: dict[str, tuple[int, int] | None] = {}
    for ns in fleet.members:
        sysctls = snapshots[ns.name].sysctls
        assert sysctls is not None
        for name in ("net.core.somaxconn", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_syncookies"):
            assert sysctls.get(name) == int(ns.read_sysctl(name)), (ns.name, name)
        low, high = (int(word) for word in ns.read_sysctl("net.ipv4.ip_local_port_range").split())
        assert sysctls.port_range == (low, high)
        somaxconn[ns.name] = sysctls.get("net.core.somaxconn")
        port_ranges[ns.name] = sysctls.port_range
    assert somaxconn == {
        fleet.saturated.name: 128,
        fleet.healthy.name: 8192,
        fleet.warned.name: 128,
    }
    assert port_ranges[fleet.healthy.name] == (40000, 60999)
    assert port_ranges[fleet.saturated.name] != (40000, 60999)


def test_each_namespace_has_its_own_kernel_counters(
    fleet: Fleet, polled: tuple[dict[str, Snapshot], dict[str, Seen]]
) -> None:
    snapshots, seen = polled
    for name in fleet.names:
        counters = snapshots[name].counters
        assert counters is not None
        for counter in WATCHED_COUNTERS:
            assert counters.get(counter) == seen[name].counters[counter], (name, counter)
    assert seen[fleet.saturated.name].counters["TcpExtListenOverflows"] >= 3
    assert seen[fleet.healthy.name].counters["TcpExtListenOverflows"] == 0


def test_one_process_scan_attributes_sockets_in_every_namespace(
    fleet: Fleet, polled: tuple[dict[str, Snapshot], dict[str, Seen]]
) -> None:
    snapshots, _ = polled
    for ns, population, port in (
        (fleet.saturated, fleet.queue_full, SATURATED_PORT),
        (fleet.healthy, fleet.serving, 20001),
    ):
        snapshot = snapshots[ns.name]
        assert snapshot.sockets is not None and snapshot.attribution is not None
        [listener] = [lsn for lsn in snapshot.sockets.listeners if lsn.port == port]
        owner = snapshot.attribution.owner(listener.inode)
        assert owner is not None and owner.pid == population.info["pid"], (ns.name, owner)
    scans = [s for snap in snapshots.values() for s in snap.sources if s.name == "processes"]
    assert len(scans) == len(snapshots)
    assert len({id(snap.attribution) for snap in snapshots.values()}) == 1  # one scan, shared


# -- namespaces that come and go --------------------------------------------------------------


def test_a_namespace_removed_between_polls_drops_out_and_a_new_one_appears(
    integration_prerequisites: None,
) -> None:
    prefix = f"tw-{secrets.token_hex(3)}"
    selection = (f"{prefix}-*",)  # matches only what this test makes
    with contextlib.ExitStack() as stack:
        stays = stack.enter_context(Netns(prefix))
        doomed = stack.enter_context(Netns(prefix))
        populations.established(stays, pairs=5, port=20001)
        populations.established(doomed, pairs=7, port=20001)
        first = poll(CollectSettings(), selection)
        assert sorted(s.netns for s in first) == sorted((stays.name, doomed.name))
        assert failed_sources(first) == []
        by_name = {s.netns: s for s in first}
        doomed_table = by_name[doomed.name].sockets
        assert doomed_table is not None and doomed_table.counts["ipv4"]["established"] == 14

        doomed.close()  # kills its helper, then `ip netns del`
        newcomer = stack.enter_context(Netns(prefix))
        second = poll(CollectSettings(), selection)
        assert sorted(s.netns for s in second) == sorted((stays.name, newcomer.name))
        assert failed_sources(second) == []
        fresh = {s.netns: s for s in second}[newcomer.name]
        assert fresh.identity.inode == ip_netns_inode(newcomer.name)
        assert fresh.sockets is not None and fresh.sockets.total("established") == 0


def test_a_namespace_that_vanishes_after_discovery_is_left_out_quietly(
    integration_prerequisites: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Removed between discovery and entering it: no error, no failed snapshot, no warning."""
    prefix = f"tw-{secrets.token_hex(3)}"
    with Netns(prefix) as stays, Netns(prefix) as doomed:
        real_discover = netns_source.discover

        def discover_then_remove(
            paths: ProcPaths, run_netns_dir: str = netns_source.RUN_NETNS_DIR
        ) -> tuple[netns_source.NetnsTarget, ...]:
            targets = real_discover(paths, run_netns_dir)
            assert doomed.name in [t.name for t in targets]
            doomed.close()
            return targets

        monkeypatch.setattr(netns_source, "discover", discover_then_remove)
        with caplog.at_level("WARNING"):
            snapshots = poll(CollectSettings(), (f"{prefix}-*",))
        assert [s.netns for s in snapshots] == [stays.name]
        assert failed_sources(snapshots) == []
        assert [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"] == []


# -- a namespace no `ip netns` name points at --------------------------------------------------

LISTENER_PROGRAM = """
import select, socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(int(sys.argv[2]))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
while (left := end - time.monotonic()) > 0:
    select.select([], [], [], left)
"""
UNSHARED_PORT = 20050
UNSHARED_BACKLOG = 7
HELPER_SECONDS = 120.0


@contextlib.contextmanager
def helpers() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by the test, each in its own session; all killed on the way out."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.02)


def net_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as handle:
        return handle.read().strip()


def test_a_namespace_made_by_unshare_is_found_and_named_by_its_inode(
    integration_prerequisites: None,
) -> None:
    with helpers() as started:
        holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec sleep {HELPER_SECONDS:g}"],
            start_new_session=True,
            text=True,
        )
        started.append(holder)
        wait_for(lambda: comm(holder.pid) == "sleep", "unshare --net ... exec sleep")
        inode = net_inode(holder.pid)
        assert inode != net_inode("self")
        enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
        listener = subprocess.Popen(
            [
                *enter,
                sys.executable,
                "-c",
                LISTENER_PROGRAM,
                str(UNSHARED_PORT),
                str(UNSHARED_BACKLOG),
                f"{HELPER_SECONDS:g}",
            ],
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(listener)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        assert net_inode(listener.pid) == inode
        name = f"ns:{inode}"

        [found] = [t for t in netns_source.discover(ProcPaths()) if t.inode == inode]
        assert found.name == name
        assert found.path == f"/proc/{min(holder.pid, listener.pid)}/ns/net"

        def ss(*args: str) -> list[SsSocket]:
            done = subprocess.run(
                [*enter, "ss", *args], capture_output=True, text=True, timeout=30, check=True
            )
            return parse_ss(done.stdout)

        [snapshot] = poll(CollectSettings(), (name,))
        assert snapshot.netns == name and snapshot.identity.inode == inode
        assert failed_sources([snapshot]) == []
        assert snapshot.sockets is not None and snapshot.attribution is not None
        assert (
            listener_rows(snapshot, "ipv4")
            == sorted(
                (s.local_address, s.local_port, s.recv_q, s.send_q) for s in ss("-lntH", "-4")
            )
            == [("127.0.0.1", UNSHARED_PORT, 0, UNSHARED_BACKLOG)]
        )
        counted = Counter(s.state for s in ss("-tanH"))
        assert {state: snapshot.sockets.total(state) for state in STATES} == {
            state: counted.get(state, 0) for state in STATES
        }
        [lsn] = snapshot.sockets.listeners
        owner = snapshot.attribution.owner(lsn.inode)
        assert owner is not None and owner.pid == listener.pid

        for process in started:  # the namespace dies with its last process
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        assert poll(CollectSettings(), (name,)) == ()


# -- the command line -------------------------------------------------------------------------


def tcpwatch(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tcpwatch ARGS`` in the host namespace, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "tcpwatch", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=tcpwatch_env(),
        cwd=str(REPO_ROOT),
        check=False,
    )


def check_json(*names: str) -> tuple[int, dict[str, Any]]:
    done = tcpwatch("check", "--netns", ",".join(names), "--format", "json", "--window", "1")
    assert done.returncode in (0, 1, 2), done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, document


def findings_by_namespace(document: Mapping[str, Any]) -> dict[str, set[str]]:
    grouped: dict[str, set[str]] = defaultdict(set)
    for finding in document["findings"]:
        grouped[finding["netns"]].add(finding["id"])
    return dict(grouped)


def test_check_groups_findings_by_namespace_and_exits_with_the_worst(fleet: Fleet) -> None:
    code, document = check_json(*fleet.names)
    assert sorted(n["netns"] for n in document["namespaces"]) == sorted(fleet.names)
    assert [s for s in document["sources"] if not s["ok"]] == []
    grouped = findings_by_namespace(document)
    assert set(grouped) <= set(fleet.names)
    assert {"Q01", "K05"} <= grouped[fleet.saturated.name]
    assert grouped.get(fleet.healthy.name, set()) == set()
    assert grouped[fleet.warned.name] == {"K05"}
    [queue] = [
        f for f in document["findings"] if f["id"] == "Q01" and f["netns"] == fleet.saturated.name
    ]
    assert (queue["severity"], queue["evidence"]["queue_max"]) == ("critical", BACKLOG)
    assert f"ip netns exec {fleet.warned.name} sysctl -w net.core.somaxconn=" in next(
        f["remediation"] for f in document["findings"] if f["netns"] == fleet.warned.name
    )
    assert (code, document["exit_code"], document["status"]) == (2, 2, "CRITICAL")

    # The exit code is the worst namespace's: warning alone, then nothing at all.
    code, document = check_json(fleet.healthy.name, fleet.warned.name)
    assert (code, document["status"]) == (1, "WARNING")
    assert findings_by_namespace(document) == {fleet.warned.name: {"K05"}}
    code, document = check_json(fleet.healthy.name)
    assert (code, document["status"], document["findings"]) == (0, "OK", [])


def promtool_check(exposition: str) -> None:
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"promtool check metrics: {done.stdout}{done.stderr}"


def samples(exposition: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(exposition) for s in family.samples]


def test_metrics_for_chosen_namespaces_pass_promtool_with_one_info_each(fleet: Fleet) -> None:
    done = tcpwatch("metrics", "--netns", ",".join(fleet.names))
    assert done.returncode == 0, done.stderr
    promtool_check(done.stdout)
    seen = samples(done.stdout)
    info = [s for s in seen if s.name == "tcpwatch_netns_info"]
    assert sorted(s.labels["netns"] for s in info) == sorted(fleet.names)
    for sample in info:
        assert sample.value == 1
        assert sample.labels["inode"] == str(ip_netns_inode(sample.labels["netns"]))
        assert {sample.labels[k] for k in ("container", "pod", "pod_namespace", "pod_uid")} == {""}
    [polled] = [s for s in seen if s.name == "tcpwatch_netns_polled"]
    assert polled.value == len(fleet.names)
    assert {s.labels["netns"] for s in seen if "netns" in s.labels} == set(fleet.names)
    somaxconn = {
        s.labels["netns"]: s.value
        for s in seen
        if s.name == "tcpwatch_sysctl" and s.labels["name"] == "net.core.somaxconn"
    }
    assert somaxconn == {
        fleet.saturated.name: 128,
        fleet.healthy.name: 8192,
        fleet.warned.name: 128,
    }
    queue = {
        (s.labels["netns"], s.labels["port"]): s.value
        for s in seen
        if s.name == "tcpwatch_listen_queue_length"
    }
    assert queue[(fleet.saturated.name, str(SATURATED_PORT))] == BACKLOG + 1
    assert queue[(fleet.healthy.name, "20001")] == 0


def test_metrics_for_all_namespaces_pass_promtool_with_one_info_each(fleet: Fleet) -> None:
    """Other tests' namespaces may come and go meanwhile: only invariants are asserted of them."""
    done = tcpwatch("metrics", "--netns", "all")
    assert done.returncode == 0, done.stderr
    promtool_check(done.stdout)
    seen = samples(done.stdout)
    info = Counter(s.labels["netns"] for s in seen if s.name == "tcpwatch_netns_info")
    assert set(info.values()) == {1}, f"namespaces with more than one info series: {info}"
    assert "host" in info and set(fleet.names) <= set(info)
    [polled] = [s for s in seen if s.name == "tcpwatch_netns_polled"]
    assert polled.value == len(info)
    assert {s.labels["netns"] for s in seen if "netns" in s.labels} <= set(info)


def test_self_is_identified_by_its_inode_like_every_polled_namespace(fleet: Fleet) -> None:
    """The default `namespaces: self`, run inside a namespace: same info series as with --netns."""
    done = fleet.healthy.run(
        sys.executable, "-m", "tcpwatch", "metrics",
        check=False, timeout=COMMAND_TIMEOUT, env=tcpwatch_env(), cwd=str(REPO_ROOT),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [info] = [s for s in samples(done.stdout) if s.name == "tcpwatch_netns_info"]
    assert info.labels["netns"] == fleet.healthy.name
    assert info.labels["inode"] == str(ip_netns_inode(fleet.healthy.name))
