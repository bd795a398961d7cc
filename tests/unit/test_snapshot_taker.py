"""serve's SnapshotTaker: what it carries from one poll to the next."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from tcpwatch import pipeline, snapshot
from tcpwatch.config import CollectSettings, Config
from tcpwatch.model import Attribution, ProcessRef, Snapshot, SocketTable


def table() -> SocketTable:
    return SocketTable({}, (), (), (), (), {}, "derived", 0)


class FakePoll:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Snapshot, ...]:
        self.calls.append(kwargs)
        owners = Attribution({7: ProcessRef(1, "app")}, 1, True, locations={7: (1, "3")})
        return (Snapshot("host", 0.0, table(), None, None, None, owners),)


@pytest.fixture
def fake_poll(monkeypatch: pytest.MonkeyPatch) -> FakePoll:
    fake = FakePoll()
    monkeypatch.setattr(snapshot, "poll", fake)
    return fake


def config(interval: float) -> Config:
    return replace(Config(), collect=CollectSettings(destinations_interval=interval))


def test_destinations_are_rescanned_only_when_due(fake_poll: FakePoll) -> None:
    now = [1000.0]
    take = pipeline.SnapshotTaker(clock=lambda: now[0])
    for step in (0, 20, 20, 25, 10):  # at 1000, 1020, 1040, 1065, 1075
        now[0] += step
        take(config(60))
    earlier: list[Mapping[str, SocketTable] | None] = [c["earlier"] for c in fake_poll.calls]
    # 1000 scans; 1020 and 1040 reuse it; 1065 is 65 s later: scans; 1075 reuses.
    assert [e is None for e in earlier] == [True, False, False, True, False]
    assert earlier[1] is not None and set(earlier[1]) == {"host"}


def test_interval_zero_scans_every_poll_and_owners_are_carried(fake_poll: FakePoll) -> None:
    take = pipeline.SnapshotTaker(clock=lambda: 0.0)
    take(config(0))
    take(config(0))
    assert [c["earlier"] for c in fake_poll.calls] == [None, None]
    assert fake_poll.calls[0]["known_owners"] is None
    known = fake_poll.calls[1]["known_owners"]
    assert known is not None and known.locations == {7: (1, "3")}
