"""sd_notify datagrams, received on sockets the tests bind (a tmp_path path, an abstract name)."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpwatch.sdnotify import Notifier, socket_address, watchdog_period


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, as systemd's /run/systemd/notify is."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert (
        socket_address("@/org/freedesktop/systemd1/notify/1")
        == "\0/org/freedesktop/systemd1/notify/1"
    )
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_period(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_period(environ, pid=4242) == expected


def test_messages_arrive_as_systemd_expects(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready("polling every 15s;\n2 findings")
    assert sock.recv(4096) == b"READY=1\nSTATUS=polling every 15s; 2 findings"

    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"

    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"

    assert notifier.status("reloaded")
    assert sock.recv(4096) == b"STATUS=reloaded"


def test_reloading_carries_the_monotonic_clock(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket() -> None:
    name = f"tcpwatch-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_watchdog_period_only_with_a_socket(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(env).watchdog_seconds == 1.0
    assert Notifier.from_environment({"WATCHDOG_USEC": "2000000"}).watchdog_seconds is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_unusable_address_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:99"})
    assert not notifier.enabled
    assert "vsock:2:99" in caplog.text
