"""A long-lived source in a real `tcpwatch serve`: started once, drained every poll, its failure
reported through tcpwatch_source_up like any other source, restarted, switched off by a reload
and closed at stop.

The example source (tests/integration/example_source.py) is loaded through
TCPWATCH_SOURCE_MODULES; it gathers datagrams sent to a UNIX socket between polls and writes what
the pipeline asks of it to a journal, which is what these tests read beside /metrics.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import Netns
from .test_serve import Served, start_serve, value, write

pytestmark = pytest.mark.integration

WAIT = 20.0


@pytest.fixture
def example_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "example"
    directory.mkdir()
    yield directory


def journal(directory: Path) -> list[str]:
    path = directory / "journal"
    return path.read_text().splitlines() if path.exists() else []


def wait_for(directory: Path, predicate: str, after: int = 0) -> list[str]:
    """Journal lines from index ``after`` once one starts with ``predicate``."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        lines = journal(directory)[after:]
        if any(line.startswith(predicate) for line in lines):
            return lines
        time.sleep(0.1)
    raise AssertionError(f"no journal line {predicate!r} after #{after}: {journal(directory)}")


def drained(directory: Path, after: int) -> int:
    """Datagrams the drains since journal line ``after`` handed over."""
    lines = journal(directory)[after:]
    return sum(int(line.split()[2]) for line in lines if line.startswith("drain"))


def send(directory: Path, payload: bytes, count: int = 1) -> None:
    sockets = [p for p in directory.iterdir() if p.suffix == ".sock"]
    assert len(sockets) == 1, sockets
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        for _ in range(count):
            sender.sendto(payload, str(sockets[0]))


@pytest.fixture
def served_processes() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
        served.process.wait(timeout=10)


def start(netns: Netns, log: Path, started: list[Served], directory: Path, config: str) -> Served:
    served = start_serve(
        netns,
        log,
        "--listen",
        "127.0.0.1:19477",
        "--interval",
        "1",
        "--config",
        config,
        env={
            "TCPWATCH_SOURCE_MODULES": "tests.integration.example_source",
            "TCPWATCH_EXAMPLE_SOURCE_DIR": str(directory),
        },
    )
    started.append(served)
    served.wait_ready()
    return served


def test_started_once_drained_each_poll_failure_reported_reload_and_stop(
    served_processes: list[Served], netns: Netns, example_dir: Path, tmp_path: Path
) -> None:
    config = write(tmp_path / "config.yaml", "interval: 1\n")
    served = start(netns, tmp_path / "serve.log", served_processes, example_dir, config)

    # Started once, inside the namespace, and drained by every poll.
    wait_for(example_dir, "drain")
    starts = [line for line in journal(example_dir) if line.startswith("start")]
    assert len(starts) == 1, journal(example_dir)
    inode = int(starts[0].split()[1])
    assert inode == os.stat(f"/run/netns/{netns.name}").st_ino, "started in the served namespace"
    samples = served.wait_for_polls(0)
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="example") == 1.0

    # What was gathered between two polls is what the next drain hands over, exactly.
    mark = len(journal(example_dir))
    send(example_dir, b"hello", count=25)
    lines = wait_for(example_dir, "drain", after=mark)
    counts = [
        int(line.split()[2]) for line in journal(example_dir)[mark:] if line.startswith("drain")
    ]
    deadline = time.monotonic() + WAIT
    while sum(counts) < 25 and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = [
            int(line.split()[2]) for line in journal(example_dir)[mark:] if line.startswith("drain")
        ]
    assert sum(counts) == 25, lines

    # A failing gatherer: the next poll reports it like any other failing source, closes it,
    # and the poll after that starts it afresh.
    mark = len(journal(example_dir))
    send(example_dir, b"fail")
    wait_for(example_dir, "close", after=mark)
    deadline = time.monotonic() + WAIT
    seen_down = False
    while time.monotonic() < deadline and not seen_down:
        samples = served.metrics()
        seen_down = value(samples, "tcpwatch_source_up", netns=netns.name, source="example") == 0.0
        time.sleep(0.1)
    errors = value(samples, "tcpwatch_source_errors_total", netns=netns.name, source="example")
    assert seen_down or (errors or 0) >= 1, "the failure never showed in tcpwatch_source_*"
    wait_for(example_dir, "start", after=mark)
    polls = served.polls()
    samples = served.wait_for_polls(polls + 1)
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="example") == 1.0
    errors = value(samples, "tcpwatch_source_errors_total", netns=netns.name, source="example")
    assert errors == 1.0
    assert "asked to fail" in served.log()

    # A reload that switches the source off closes it; its series go.
    mark = len(journal(example_dir))
    write(tmp_path / "config.yaml", "interval: 1\ncollect:\n  disabled_sources: [example]\n")
    served.signal(signal.SIGHUP)
    wait_for(example_dir, "close", after=mark)
    polls = served.polls()
    samples = served.wait_for_polls(polls + 1)
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="example") is None

    # Switched back on: started again; SIGTERM closes it before the process exits.
    mark = len(journal(example_dir))
    write(tmp_path / "config.yaml", "interval: 1\n")
    served.signal(signal.SIGHUP)
    wait_for(example_dir, "start", after=mark)
    mark = len(journal(example_dir))
    served.signal(signal.SIGTERM)
    assert served.process.wait(timeout=5) == 0
    assert any(line.startswith("close") for line in journal(example_dir)[mark:]), journal(
        example_dir
    )
    assert not any(p.suffix == ".sock" for p in example_dir.iterdir()), "socket left behind"


def test_an_unknown_disabled_source_is_one_line_and_exit_3(netns: Netns, tmp_path: Path) -> None:
    from .netns import run_tcpwatch

    config = write(tmp_path / "config.yaml", "collect:\n  disabled_sources: [nosuch]\n")
    result = run_tcpwatch(netns, "check", "--config", config, "--window", "0")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "collect.disabled_sources[0]" in lines[0] and "nosuch" in lines[0]
