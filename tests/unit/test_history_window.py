"""Rules judge a window of recent polls (``rules.window``), not the last interval: where the
window starts, what is kept for the next polls, and a pipeline whose findings hold steady while a
counter moves only every few polls."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from tcpwatch.config import Config
from tcpwatch.history import MAX_WINDOW_POLLS, remember, window_start
from tcpwatch.model import KernelCounters, NetnsIdentity, Snapshot
from tcpwatch.pipeline import Pipeline
from tests.unit.test_daemon import make_snapshot


def at(taken_at: float, inode: int = 1) -> Snapshot:
    return replace(make_snapshot(taken_at=taken_at), identity=NetnsIdentity(inode=inode))


def polls(*times: float) -> tuple[Snapshot, ...]:
    return tuple(at(t) for t in times)


def test_the_window_starts_at_the_oldest_poll_within_it() -> None:
    kept = polls(0, 15, 30, 45, 60)
    assert window_start(kept, at(75), 60).taken_at == 15
    # timer jitter: a poll a little older than the window still starts it (half an interval)
    assert window_start(polls(-0.4, 15, 30, 45), at(60), 60).taken_at == -0.4
    assert window_start(polls(-8, 15, 30, 45), at(60), 60).taken_at == 15


def test_a_window_shorter_than_an_interval_is_the_last_interval() -> None:
    assert window_start(polls(0, 15), at(30), 5).taken_at == 15
    assert window_start((), at(30), 60) is None


def test_a_recreated_namespace_starts_afresh() -> None:
    old = polls(0, 15)
    assert window_start(old, at(30, inode=2), 60) is None
    assert remember(old, at(30, inode=2), 60) == (at(30, inode=2),)


def test_remember_keeps_what_the_next_windows_start_at() -> None:
    kept: tuple[Snapshot, ...] = ()
    for t in range(0, 200, 15):
        kept = remember(kept, at(t), 60)
    # the next poll (at 210) starts its window at 150; an interval more is kept, in case the
    # next poll comes late
    assert [p.taken_at for p in kept] == [120, 135, 150, 165, 180, 195]
    assert window_start(kept, at(210), 60).taken_at == 150


def test_remember_is_bounded_however_long_the_window() -> None:
    kept: tuple[Snapshot, ...] = ()
    for t in range(0, 7200):  # two hours of 1 s polls, a one-hour window
        kept = remember(kept, at(t), 3600)
    assert len(kept) <= MAX_WINDOW_POLLS + 2
    assert kept[-1].taken_at == 7199
    start = window_start(kept, at(7200), 3600)
    assert start is not None and 3600 - 3600 / MAX_WINDOW_POLLS <= 7200 - start.taken_at <= 3601


def test_rules_window_is_read_from_the_config() -> None:
    from tcpwatch.config import ConfigError, parse_config

    assert Config().rules_window == 60
    assert parse_config("rules:\n  window: 2m\n", "t.yaml").rules_window == 120
    with pytest.raises(ConfigError, match=r"rules\.window"):
        parse_config("rules:\n  window: 0\n", "t.yaml")
    # a rule beside it is still a rule
    config = parse_config("rules:\n  window: 30s\n  Q03: false\n", "t.yaml")
    assert config.rules_window == 30 and not config.rules["Q03"].enabled


class Scripted:
    def __init__(self, snapshots: list[Snapshot]) -> None:
        self._snapshots: Iterator[Snapshot] = iter(snapshots)

    def __call__(self, config: Config) -> tuple[Snapshot, ...]:
        return (next(self._snapshots),)


def test_a_counter_moving_every_few_polls_keeps_its_finding() -> None:
    """A listener overflowing on SYN retries every 3 s, polled every second: judged over the last
    interval Q02 fires one poll in three; judged over a 5 s window it fires on every poll."""
    snapshots = []
    total = 0
    for second in range(12):
        if second % 3 == 0:
            total += 4
        counters = KernelCounters({"TcpExtListenOverflows": total, "TcpExtListenDrops": total})
        snapshots.append(replace(at(1000 + second), counters=counters))

    def q02_per_poll(window: float) -> list[bool]:
        pipeline = Pipeline(take=Scripted(list(snapshots)), clock=lambda: 0.0)
        config = replace(Config(), interval=1, rules_window=window)
        states = [pipeline.poll(config) for _ in snapshots]
        return [any(f.rule_id == "Q02" for f in state.findings) for state in states[5:]]

    assert q02_per_poll(1) == [False, True, False, False, True, False, False]
    assert q02_per_poll(5) == [True] * 7
