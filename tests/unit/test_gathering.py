"""The gathering thread: gatherers fed when readable, and read in batches when they ask for it
(``read_delay``), without the thread sleeping for one of them."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import pytest

from tcpwatch.config import CollectSettings
from tcpwatch.gathering import Gathering, collector_paused
from tcpwatch.model import Snapshot
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.base import LongLivedSource, SourceContext

CONTEXT = SourceContext(ProcPaths(), CollectSettings(), "test", 1, 0.0)
WAIT = 5.0


class PipeGatherer:
    """Reads a pipe; records when each read_ready ran and how many bytes it found."""

    def __init__(self, read_delay: float | None) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if read_delay is not None:
            self.read_delay = read_delay
        self.reads: list[tuple[float, int]] = []
        self.collector_on_while_reading: list[bool] = []
        self.fed = threading.Event()
        self.closed = False

    def fileno(self) -> int:
        return self.read_end

    def read_ready(self) -> None:
        try:
            data = os.read(self.read_end, 65536)
        except BlockingIOError:
            data = b""
        self.collector_on_while_reading.append(gc.isenabled())
        self.reads.append((time.monotonic(), len(data)))
        self.fed.set()

    def drain(self, so_far: Snapshot) -> int:
        return sum(size for _, size in self.reads)

    def close(self) -> None:
        self.closed = True
        os.close(self.read_end)
        os.close(self.write_end)

    def send(self, data: bytes = b"x") -> None:
        os.write(self.write_end, data)

    def wait_fed(self) -> None:
        assert self.fed.wait(WAIT), "the gatherer was not fed"
        self.fed.clear()


@pytest.fixture
def gathering() -> Iterator[Gathering]:
    running = Gathering()
    yield running
    running.close()


def start(gathering: Gathering, name: str, gatherer: PipeGatherer) -> tuple[int, str]:
    key = (1, name)
    gathering.ensure(key, LongLivedSource(name, None, 1, lambda context: gatherer), CONTEXT)
    return key


def test_a_gatherer_with_a_read_delay_is_not_watched_until_the_delay_has_passed(
    gathering: Gathering,
) -> None:
    delay = 0.3
    batched = PipeGatherer(read_delay=delay)
    start(gathering, "batched", batched)
    batched.send()
    batched.wait_fed()
    first = batched.reads[-1][0]
    for _ in range(5):  # arrives during the delay: read together once the delay has passed
        batched.send()
    batched.wait_fed()
    second_at, second_size = batched.reads[-1]
    assert second_at - first >= delay * 0.9
    assert second_size == 5
    assert len(batched.reads) == 2


def test_the_thread_keeps_feeding_others_while_one_waits_out_its_delay(
    gathering: Gathering,
) -> None:
    batched = PipeGatherer(read_delay=2.0)
    prompt = PipeGatherer(read_delay=None)
    start(gathering, "batched", batched)
    start(gathering, "prompt", prompt)
    batched.send()
    batched.wait_fed()
    batched.send()  # waits for the delay
    for _ in range(3):
        sent = time.monotonic()
        prompt.send()
        prompt.wait_fed()
        assert prompt.reads[-1][0] - sent < 0.5
    assert len(batched.reads) == 1
    assert len(prompt.reads) == 3


def test_without_a_read_delay_every_readable_moment_is_fed(gathering: Gathering) -> None:
    prompt = PipeGatherer(read_delay=None)
    start(gathering, "prompt", prompt)
    for _ in range(3):
        prompt.send()
        prompt.wait_fed()
    assert [size for _, size in prompt.reads] == [1, 1, 1]


def test_a_gatherer_retired_during_its_delay_is_not_watched_again(gathering: Gathering) -> None:
    batched = PipeGatherer(read_delay=0.2)
    key = start(gathering, "batched", batched)
    batched.send()
    batched.wait_fed()
    gathering.retire(())
    assert batched.closed
    assert key not in gathering.keys
    time.sleep(0.4)  # the delay passes: resuming must skip the closed gatherer
    again = PipeGatherer(read_delay=0.2)
    start(gathering, "batched", again)  # same key, a new descriptor
    again.send()
    again.wait_fed()
    value, status = gathering.drain(
        key, "batched", Snapshot("test", 0.0, None, None, None, None, None)
    )
    assert status.ok, status
    assert value == 1


def test_the_garbage_collector_waits_while_a_gatherer_reads(gathering: Gathering) -> None:
    """A read's short-lived objects are freed by reference counting at its end: a collection in
    the middle of it would scan them all (docs/performance.md). Put off, then back on."""
    assert gc.isenabled()
    prompt = PipeGatherer(read_delay=None)
    start(gathering, "prompt", prompt)
    for _ in range(3):
        prompt.send()
        prompt.wait_fed()
    assert prompt.collector_on_while_reading == [False, False, False]
    assert gc.isenabled()


def test_a_collector_switched_off_before_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


class SharingGatherer(PipeGatherer):
    """A PipeGatherer that takes the gathering thread's shared objects."""

    def __init__(self) -> None:
        super().__init__(read_delay=None)
        self.shared: list[dict[str, object]] = []

    def share(self, shared: dict[str, object]) -> None:
        assert not self.reads, "shared objects come before the first read"
        self.shared.append(shared)


def test_every_gatherer_that_shares_gets_the_one_thread_objects(gathering: Gathering) -> None:
    """Each gatherer with a ``share`` method is given, once and before it is fed, the same dict
    (the destroy readers keep their common receive slots there); others are fed as before."""
    first, second, plain = SharingGatherer(), SharingGatherer(), PipeGatherer(read_delay=None)
    for name, gatherer in (("first", first), ("second", second), ("plain", plain)):
        start(gathering, name, gatherer)
    start(gathering, "first", first)  # already running: not shared again
    assert len(first.shared) == len(second.shared) == 1
    assert first.shared[0] is second.shared[0]
    for gatherer in (first, second, plain):
        gatherer.send()
        gatherer.wait_fed()
    other = Gathering()
    try:
        third = SharingGatherer()
        other.ensure((1, "third"), LongLivedSource("third", None, 1, lambda c: third), CONTEXT)
        assert third.shared[0] is not first.shared[0]  # another thread, its own objects
    finally:
        other.close()
