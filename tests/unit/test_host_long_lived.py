"""A host-wide long-lived source (kernel tracepoints are global): started once for every
namespace, drained with their snapshots so far, each namespace given its own share and the one
status; a failure reported, not raised; one-shot commands leave it out."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.gathering import HOST, Gathering
from tcpwatch.model import Snapshot
from tcpwatch.paths import ProcPaths
from tcpwatch.snapshot import take_snapshot
from tcpwatch.sources.base import HostLongLivedSource, Partial, SourceContext

PROC = ProcPaths(root=str(Path(__file__).resolve().parents[1] / "fixtures" / "proc"))


class Shares:
    """Gives each namespace the number of drains so far plus its inode; counts its starts."""

    starts = 0

    def __init__(self, skipped: tuple[str, ...] = ()) -> None:
        Shares.starts += 1
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.drains = 0
        self.skipped = skipped
        self.seen: list[tuple[str, ...]] = []

    def fileno(self) -> int:
        return self.read_end

    def read_ready(self) -> None:
        os.read(self.read_end, 64)

    def drain(self, so_far: Sequence[Snapshot]) -> Mapping[int, object] | Partial:
        self.drains += 1
        self.seen.append(tuple(snapshot.netns for snapshot in so_far))
        value = {snapshot.identity.inode: (self.drains, snapshot.netns) for snapshot in so_far}
        return Partial(value, self.skipped) if self.skipped else value

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


@pytest.fixture
def gathering() -> Iterator[Gathering]:
    running = Gathering()
    yield running
    running.close()


def poll(source: HostLongLivedSource, gathering: Gathering | None) -> Snapshot:
    return take_snapshot(
        CollectSettings(), PROC, netns="test", sources=[source], gathering=gathering
    )


def test_it_starts_once_and_each_poll_drains_the_share_of_each_namespace(
    gathering: Gathering,
) -> None:
    Shares.starts = 0
    started: list[Shares] = []

    def start(context: SourceContext) -> Shares:
        started.append(Shares())
        return started[-1]

    source = HostLongLivedSource("everywhere", None, 90, start)
    first, second = poll(source, gathering), poll(source, gathering)
    assert Shares.starts == 1 and (HOST, "everywhere") in gathering.keys
    assert started[0].seen == [("test",), ("test",)]
    assert [s.sources[-1].name for s in (first, second)] == ["everywhere", "everywhere"]
    assert all(s.sources[-1].ok for s in (first, second))


def test_the_share_fills_the_declared_field(gathering: Gathering) -> None:
    source = HostLongLivedSource("everywhere", "tracepoints", 90, lambda context: Shares())
    snapshot = poll(source, gathering)
    assert snapshot.tracepoints == (1, "test")


def test_a_failed_start_is_a_failed_status_and_is_tried_again(gathering: Gathering) -> None:
    attempts: list[int] = []

    def start(context: SourceContext) -> Shares:
        attempts.append(1)
        raise PermissionError("perf_event_open: needs CAP_PERFMON")

    source = HostLongLivedSource("everywhere", "tracepoints", 90, start)
    for _ in range(2):
        snapshot = poll(source, gathering)
        (status,) = snapshot.sources
        assert not status.ok and status.error == "perf_event_open: needs CAP_PERFMON"
        assert snapshot.tracepoints is None
    assert len(attempts) == 2


def test_partial_shares_mark_it_degraded(gathering: Gathering) -> None:
    source = HostLongLivedSource(
        "everywhere", None, 90, lambda context: Shares(("drop: no reasons on this kernel",))
    )
    (status,) = poll(source, gathering).sources
    assert status.ok and status.skipped == ("drop: no reasons on this kernel",)


def test_one_shot_commands_leave_it_out() -> None:
    source = HostLongLivedSource("everywhere", None, 90, lambda context: Shares())
    assert poll(source, None).sources == ()
