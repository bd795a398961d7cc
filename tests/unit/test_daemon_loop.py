"""The running daemon in-process: poll thread, readiness, watchdog pings, reloads and stop.

Snapshots come from a scripted source (no kernel); systemd is a datagram socket in tmp_path; the
web server listens on an ephemeral loopback port.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from tcpwatch.config import CollectSettings, Config, ConfigError, RuleOverride, load_config
from tcpwatch.daemon import Daemon
from tcpwatch.errors import UsageError
from tcpwatch.http.listen import ListenAddress
from tcpwatch.model import Snapshot
from tcpwatch.pipeline import Pipeline
from tcpwatch.sdnotify import Notifier

from .test_daemon import make_snapshot

WAIT = 5.0  # every wait below is bounded by this


class Source:
    """Snapshots on demand; ``hang`` makes the next poll block until released."""

    def __init__(self) -> None:
        self.polls = 0
        self.configs: list[Config] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self.fail_next = False

    def __call__(self, config: Config) -> tuple[Snapshot, ...]:
        self.polls += 1
        self.configs.append(config)
        if self.hang.is_set():
            self.release.wait(WAIT)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the poll broke")
        return (make_snapshot(taken_at=time.time(), close_wait=[1, 2, 3]),)


class Systemd:
    """A notify socket: collects every datagram sent to it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.path = path
        self.messages: list[str] = []

    def collect(self, seconds: float = 0.0) -> list[str]:
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return self.messages

    def wait_for(self, prefix: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.collect():
                if message.startswith(prefix):
                    self.messages.remove(message)
                    return message
        raise AssertionError(f"no {prefix!r} within {timeout} s; got {self.messages}")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    receiver = Systemd(str(tmp_path / "notify"))
    try:
        yield receiver
    finally:
        receiver.sock.close()


Start = Callable[..., Daemon]


@pytest.fixture
def start(systemd: Systemd, tmp_path: Path) -> Iterator[Start]:
    """Start a Daemon on 127.0.0.1:0 with a scripted source; stopped after the test."""
    daemons: list[Daemon] = []

    def run(
        config: Config | None = None,
        source: Source | None = None,
        reload: Callable[[], Config] | None = None,
        watchdog: float | None = None,
        stalled_after: float = 120.0,
    ) -> Daemon:
        config = config or Config(interval=3600.0)
        daemon = Daemon(
            config,
            reload or (lambda: config),
            notifier=Notifier(systemd.path, watchdog),
            pipeline=Pipeline(take=source or Source()),
            stalled_after=stalled_after,
            include_process_metrics=False,
        )
        daemons.append(daemon)
        daemon.start(ListenAddress("127.0.0.1", 0))
        return daemon

    yield run
    for daemon in daemons:
        daemon.stop()


def fetch(daemon: Daemon, path: str) -> tuple[int, str]:
    server = daemon.server
    assert server is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=WAIT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def procfs(tmp_path: Path) -> str:
    """A directory that passes the daemon's procfs check on reload."""
    (tmp_path / "proc" / "net").mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc" / "net" / "sockstat").write_text("")
    return str(tmp_path / "proc")


def test_ready_after_the_first_poll(start: Start, systemd: Systemd) -> None:
    source = Source()
    source.hang.set()
    daemon = start(source=source)
    assert fetch(daemon, "/-/ready")[0] == 503  # the first poll is still running
    assert fetch(daemon, "/metrics")[0] == 200  # metrics answer meanwhile (build info only)
    assert not any(m.startswith("READY=1") for m in systemd.collect(0.2))
    source.release.set()
    assert daemon.wait_for_poll(0, WAIT)
    ready = systemd.wait_for("READY=1")
    assert ready.startswith("READY=1\nSTATUS=polling every 3600s; ")
    assert fetch(daemon, "/-/ready") == (200, "Ready\n")
    status, body = fetch(daemon, "/metrics")
    assert status == 200
    assert 'tcpwatch_sockets{family="ipv4",netns="host",state="close_wait"} 3.0' in body


def test_polls_on_the_interval_and_scrapes_never_poll(start: Start) -> None:
    source = Source()
    daemon = start(Config(interval=3600.0), source)
    assert daemon.wait_for_poll(0, WAIT)
    for _ in range(20):
        assert fetch(daemon, "/metrics")[0] == 200
    assert source.polls == 1


def test_interval_is_kept(start: Start) -> None:
    source = Source()
    config = Config(interval=0.2)
    daemon = start(config, source)
    started = time.monotonic()
    assert daemon.wait_for_poll(4, WAIT)
    elapsed = time.monotonic() - started
    # 5 polls on a 0.2 s cadence: the 5th begins 0.8 s after the first.
    assert 0.7 <= elapsed < 2.5


def test_watchdog_pings_come_from_the_poll_loop(start: Start, systemd: Systemd) -> None:
    source = Source()
    daemon = start(Config(interval=3600.0), source, watchdog=0.05)
    systemd.wait_for("READY=1")
    # (1.5 s of them: on a loaded machine the thread may not run every 0.05 s)
    pings = sum(1 for m in systemd.collect(1.5) if m == "WATCHDOG=1")
    assert pings >= 4  # every 0.05 s between polls, although the next poll is an hour away
    # A poll that hangs stops the pings, so systemd's watchdog restarts a stuck tcpwatch.
    source.hang.set()
    daemon._poll_now.set()
    daemon._wake.set()
    deadline = time.monotonic() + WAIT
    while source.polls < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    systemd.collect(0.5)  # a ping may already be on its way (late on a loaded machine)
    systemd.messages.clear()
    assert systemd.collect(0.5).count("WATCHDOG=1") == 0
    source.release.set()
    assert daemon.wait_for_poll(1, WAIT)
    assert "WATCHDOG=1" in systemd.collect(0.3)


def test_a_stuck_poll_makes_healthy_fail(start: Start) -> None:
    source = Source()
    daemon = start(Config(interval=3600.0), source, stalled_after=0.3)
    assert daemon.wait_for_poll(0, WAIT)
    assert fetch(daemon, "/-/healthy")[0] == 200
    source.hang.set()
    daemon._poll_now.set()
    daemon._wake.set()
    time.sleep(0.6)
    status, body = fetch(daemon, "/-/healthy")
    assert status == 503
    assert "the poll loop is stuck" in body
    source.release.set()
    assert daemon.wait_for_poll(1, WAIT)
    assert fetch(daemon, "/-/healthy")[0] == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_http_thread_fails_health_stops_the_watchdog_and_the_daemon(
    start: Start, systemd: Systemd
) -> None:
    # Issue 21: one connection killed the HTTP thread while polls and watchdog pings went on, so
    # nothing restarted a daemon whose port no longer answered.
    daemon = start(Config(interval=3600.0), Source(), watchdog=0.05)
    systemd.wait_for("READY=1")
    assert daemon.failure() is None
    server = daemon.server
    assert server is not None

    class Fatal(BaseException):
        pass

    def die() -> None:
        raise Fatal

    server._loop_once = die  # type: ignore[method-assign]
    server._wake()
    deadline = time.monotonic() + WAIT
    while daemon.failure() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.failure() == "the HTTP server's thread http died (see the log)"
    assert daemon.health().problem == "the HTTP server's thread http died (see the log)"
    systemd.collect(0.5)  # a ping may already be on its way (late on a loaded machine)
    systemd.messages.clear()
    assert systemd.collect(0.4).count("WATCHDOG=1") == 0


def test_a_poll_that_raises_is_logged_and_the_loop_goes_on(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source()
    source.fail_next = True
    daemon = start(Config(interval=0.1), source)
    assert daemon.wait_for_poll(0, WAIT)  # the second poll succeeds
    assert source.polls >= 2
    assert "poll failed: RuntimeError: the poll broke" in caplog.text
    assert daemon.health().problem is None


def test_stop_is_quick_even_during_a_hung_poll(start: Start, systemd: Systemd) -> None:
    source = Source()
    source.hang.set()
    daemon = start(source=source)
    time.sleep(0.1)
    began = time.monotonic()
    daemon.stop()
    assert time.monotonic() - began < 2.0
    assert "STOPPING=1\nSTATUS=stopping" in systemd.collect(0.1)
    with pytest.raises(OSError):
        fetch(daemon, "/-/healthy")
    source.release.set()


# -- reloads ---------------------------------------------------------------------------------------


def test_reload_applies_interval_rules_collect_and_web_config(
    start: Start, systemd: Systemd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    web_yml = tmp_path / "web.yml"
    web_yml.write_text(f"basic_auth_users:\n  prom: '{hashed}'\n")
    old = Config(interval=3600.0, procfs=procfs(tmp_path))
    new = replace(
        old,
        source="new.yaml",
        interval=0.2,
        web_config=str(web_yml),
        collect=CollectSettings(top_processes=2),
        rules={"S01": RuleOverride(True, {"warning": 2.0})},
    )
    source = Source()
    daemon = start(old, source, reload=lambda: new)
    assert daemon.wait_for_poll(0, WAIT)
    systemd.wait_for("READY=1")
    caplog.set_level(logging.INFO, logger="tcpwatch.daemon")

    assert daemon.reload() is True
    reloading = systemd.wait_for("RELOADING=1")
    assert "\nMONOTONIC_USEC=" in reloading
    systemd.wait_for("READY=1")
    assert daemon.config is new
    # The reload polls at once with the new settings, then every 0.2 s.
    assert daemon.wait_for_poll(3, WAIT)
    assert source.configs[-1] is new
    state = daemon.state
    assert state is not None
    assert state.top_processes == 2
    assert [f.rule_id for f in state.findings if f.rule_id == "S01"] == ["S01"]
    assert fetch(daemon, "/-/healthy")[0] == 401  # basic auth is on now
    assert "configuration reloaded from new.yaml: polling self every 0.2 s" in caplog.text


def test_invalid_reload_keeps_the_running_config(
    start: Start, systemd: Systemd, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(interval=3600.0)
    errors = [
        'config.yaml: rules.Q01.warning: expected a number between 0 and 1, got "high"',
        "config.yaml: interval: expected a number between 1 and 3600, got 0",
    ]

    def broken() -> Config:
        raise ConfigError(errors)

    daemon = start(config, reload=broken)
    assert daemon.wait_for_poll(0, WAIT)
    systemd.wait_for("READY=1")
    assert daemon.reload() is False
    assert daemon.config is config
    systemd.wait_for("RELOADING=1")
    systemd.wait_for("READY=1")  # systemd's reload job ends either way
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines == [
        "reload failed, still running the previous configuration: " + "; ".join(errors)
    ]
    assert fetch(daemon, "/-/healthy")[0] == 200


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"listen": "127.0.0.1:http"}, 'listen address "127.0.0.1:http": port must be a number'),
        ({"procfs": "/nonexistent"}, "/nonexistent does not look like a procfs mount"),
        ({"web_config": "/nonexistent/web.yml"}, "/nonexistent/web.yml: cannot read the web"),
    ],
)
def test_reload_rejects_what_would_break_later(
    start: Start,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
    why: str,
) -> None:
    config = Config(interval=3600.0, procfs=procfs(tmp_path))
    daemon = start(config, reload=lambda: replace(config, **change))
    assert daemon.reload() is False
    assert daemon.config is config
    assert why in caplog.text


def test_reload_from_a_usage_error(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    def bad_flag() -> Config:
        raise UsageError("--interval: expected seconds between 1 and 3600, got 0.0")

    daemon = start(reload=bad_flag)
    assert daemon.reload() is False
    assert "--interval: expected seconds between 1 and 3600, got 0.0" in caplog.text


@pytest.mark.parametrize("which", ["config", "web_config"])
def test_reload_from_a_fifo_does_not_block(
    start: Start, systemd: Systemd, tmp_path: Path, caplog: pytest.LogCaptureFixture, which: str
) -> None:
    # Issue 12: a FIFO named by --config blocked the main thread on SIGHUP, so SIGTERM was
    # never taken. Nobody ever writes to this one: a blocking open would hang the test.
    fifo = tmp_path / "named.pipe"
    os.mkfifo(fifo)
    config = Config(interval=3600.0, procfs=procfs(tmp_path))
    if which == "config":
        reload = lambda: load_config(str(fifo))  # noqa: E731
        what = "configuration file"
    else:
        reload = lambda: replace(config, web_config=str(fifo))  # noqa: E731
        what = "web config file"
    daemon = start(config, reload=reload)
    assert daemon.wait_for_poll(0, WAIT)
    # In a thread, so a regression fails here instead of hanging the suite.
    results: list[bool] = []
    reloading = threading.Thread(target=lambda: results.append(daemon.reload()), daemon=True)
    reloading.start()
    reloading.join(WAIT)
    assert not reloading.is_alive(), "the reload blocked on the FIFO"
    assert results == [False]
    assert daemon.config is config
    assert (
        "reload failed, still running the previous configuration: "
        f"{fifo}: cannot read the {what}: it is a FIFO (named pipe), not a file" in caplog.text
    )
    systemd.wait_for("READY=1")
    assert fetch(daemon, "/-/healthy")[0] == 200


def test_changed_listen_needs_a_restart(
    start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(interval=3600.0, procfs=procfs(tmp_path), listen="127.0.0.1:0")
    daemon = start(config, reload=lambda: replace(config, listen="127.0.0.1:9999"))
    port = daemon.server.address.port if daemon.server else None
    assert daemon.reload() is True
    assert (
        "listen changed from 127.0.0.1:0 to 127.0.0.1:9999: that takes a restart; still serving "
        "on 127.0.0.1:0" in caplog.text
    )
    assert daemon.server is not None and daemon.server.address.port == port
    assert fetch(daemon, "/-/healthy")[0] == 200
