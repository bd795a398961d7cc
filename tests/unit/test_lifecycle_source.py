"""The ``lifecycle`` long-lived source: its declaration, its settings, and a gatherer that tells the
listener each poll's listeners and port range before draining."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tcpwatch.config import CollectSettings, ConfigError, parse_config
from tcpwatch.model import LifecycleStats, Listener, Snapshot, Sysctls
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.base import LongLivedSource, SourceContext
from tcpwatch.sources.lifecycle import DestroyListener, LifecycleGatherer, start_lifecycle
from tcpwatch.sources.lifecycle_peers import table_of, tracked_peers
from tcpwatch.sources.registry import registered_sources
from tests.unit.snapshots import socket_table
from tests.unit.test_lifecycle import OK_INFO, destroy_message


@pytest.fixture
def pair() -> Iterator[tuple[LifecycleGatherer, socket.socket]]:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setblocking(False)
    gatherer = LifecycleGatherer(DestroyListener(sock=reader))
    with writer:
        yield gatherer, writer
    gatherer.close()


def poll_snapshot(listeners: tuple[Listener, ...], port_range: tuple[int, int]) -> Snapshot:
    sysctls = Sysctls({"net.ipv4.ip_local_port_range": port_range})
    sockets = socket_table(listeners=listeners)
    return Snapshot("test", 0.0, sockets, None, None, sysctls, None)


def test_the_source_is_declared_long_lived_after_the_dump() -> None:
    (source,) = [s for s in registered_sources() if s.name == "lifecycle"]
    assert isinstance(source, LongLivedSource)
    assert source.field == "connections"
    assert source.order > next(s.order for s in registered_sources() if s.name == "sockdiag")
    assert source.enabled(CollectSettings())
    assert not source.enabled(CollectSettings(connections=False))


def test_drain_classifies_by_the_polls_listeners_and_port_range(
    pair: tuple[LifecycleGatherer, socket.socket],
) -> None:
    gatherer, writer = pair
    listener = Listener("ipv4", "0.0.0.0", 8080, 0, 128, 0, 1)
    first = gatherer.drain(poll_snapshot((listener,), (50000, 60999)))
    assert first.events == 0
    writer.send(destroy_message("10.0.0.1", 8080, "10.0.0.9", 55001, OK_INFO))
    writer.send(destroy_message("127.0.0.1", 40000, "127.0.0.1", 5432, OK_INFO))
    writer.send(destroy_message("127.0.0.1", 55000, "127.0.0.1", 5432, OK_INFO))
    gatherer.read_ready()
    stats = table_of(gatherer.drain(Snapshot("test", 0.0, None, None, None, None, None)))
    got = {(row.direction, row.peer): row.closed["ok"] for row in stats.peers}
    assert got == {
        ("inbound", "0.0.0.0:8080"): 1,  # the listener the poll saw
        ("inbound", "127.0.0.1:40000"): 1,  # outside the poll's range (inside the default one)
        ("outbound", "127.0.0.1:5432"): 1,
    }
    assert gatherer.read_delay == gatherer.listener.read_delay > 0


def test_start_applies_the_collect_settings() -> None:
    settings = CollectSettings(
        connection_peers=5, connection_peer_idle=60.0, connection_receive_buffer=1 << 16
    )
    context = SourceContext(ProcPaths(), settings, "test", 1, 0.0)
    gatherer = start_lifecycle.start(context)  # a real netlink socket: no privilege needed
    try:
        stats = gatherer.drain(Snapshot("test", 0.0, None, None, None, None, None))
    finally:
        gatherer.close()
    assert isinstance(stats, LifecycleStats)
    assert stats.max_peers == tracked_peers(5) == 64  # tracked: the rows are host-wide
    assert stats.receive_buffer == 2 << 16  # the kernel doubles what is asked
    assert stats.lost == 0


def test_collect_keys_parse() -> None:
    config = parse_config(
        "collect:\n"
        "  connections: false\n"
        "  connection_peers: 7\n"
        "  connection_peer_idle: 10m\n"
        "  connection_receive_buffer: 1048576\n"
        "  live_tcp_info: false\n",
        "test.yaml",
    )
    collect = config.collect
    assert (collect.connections, collect.connection_peers, collect.connection_peer_idle) == (
        False,
        7,
        600.0,
    )
    assert (collect.connection_receive_buffer, collect.live_tcp_info) == (1 << 20, False)
    assert CollectSettings().connections and CollectSettings().live_tcp_info


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("connections: 1", "collect.connections: expected true or false"),
        ("connection_peers: 20000", "collect.connection_peers: expected a whole number"),
        ("connection_peer_idle: 0s", "collect.connection_peer_idle: expected a number"),
        ("connection_receive_buffer: 100", "collect.connection_receive_buffer: expected"),
    ],
)
def test_collect_keys_are_checked(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(f"collect:\n  {line}\n", "test.yaml")
    assert any(message in error for error in raised.value.errors), raised.value.errors
