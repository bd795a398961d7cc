"""FamilyMemo and the exposition's reuse of encoded families: a family is rebuilt, and encoded,
only when something it read changed; the bytes always equal a fresh rendering."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from tcpwatch.http import exposition
from tcpwatch.http.exposition import TEXT, Expositions, negotiate
from tcpwatch.model import NetnsIdentity, Snapshot
from tcpwatch.render.families.registry import registered_families
from tcpwatch.render.memo import FamilyMemo
from tcpwatch.render.prometheus import make_registry
from tcpwatch.state import ExportState, PollHistogram
from tests.unit.snapshots import T1, sockstat
from tests.unit.snapshots import snapshot as make

OM = "application/openmetrics-text; version=1.0.0"


def _state(snapshots: tuple[Snapshot, ...], poll: int) -> ExportState:
    """The state of poll number ``poll``: its time and durations move whatever else does."""
    durations = PollHistogram().observe(0.001 * (poll + 1))
    return ExportState(
        snapshots=tuple(replace(s, taken_at=T1 + poll) for s in snapshots),
        findings=(),
        last_poll=T1 + poll,
        poll_durations=durations,
        cached=True,
    )


def _fresh(state: ExportState) -> bytes:
    return exposition._encode(TEXT, make_registry(lambda: state, include_process=False).collect())


def _memoized(memo: FamilyMemo, state: ExportState) -> bytes:
    return exposition._encode(TEXT, memo.collect(state))


HOST = make()
POD = replace(make(netns="pod"), identity=NetnsIdentity(inode=4026532999, pod="web-1"))


def test_an_unchanged_poll_rebuilds_only_the_families_that_read_its_time() -> None:
    memo = FamilyMemo()
    first = memo.collect(_state((HOST,), 0))
    assert memo.built == len(registered_families())
    second = memo.collect(_state((HOST,), 1))
    rebuilt = memo.built - len(registered_families())
    assert 1 <= rebuilt <= 3  # the pipeline's: poll time, durations (and what reads them)
    reused = sum(1 for metric in second if any(metric is old for old in first))
    assert reused >= len(second) - 10
    by_name = {m.name: m for m in second}
    assert any(m is by_name["tcpwatch_sysctl"] for m in first)
    assert not any(m is by_name["tcpwatch_last_poll_timestamp_seconds"] for m in first)


@pytest.mark.parametrize(
    "changed",
    [
        lambda s: replace(s, sockstat=sockstat(orphan=9, time_wait=40)),
        lambda s: make(sysctl_overrides={"net.core.somaxconn": (128,)}, taken_at=s.taken_at),
        lambda s: replace(s, sockets=None),  # the socket source failed
        lambda s: replace(s, netns="renamed"),
    ],
)
def test_every_poll_renders_what_a_fresh_collection_renders(changed: object) -> None:
    memo = FamilyMemo()
    other = changed(HOST)  # type: ignore[operator]
    polls = [(HOST,), (HOST,), (other,), (other,), (HOST, POD), (HOST, POD), (POD,), (HOST,)]
    for number, snapshots in enumerate(polls):
        state = _state(snapshots, number)
        assert _memoized(memo, state) == _fresh(state), number


def test_a_changed_source_rebuilds_its_families_and_not_the_others() -> None:
    memo = FamilyMemo()
    first = {m.name: m for m in memo.collect(_state((HOST,), 0))}
    busy = replace(HOST, sockstat=sockstat(orphan=9, time_wait=40))
    second = {m.name: m for m in memo.collect(_state((busy,), 1))}
    assert second["tcpwatch_orphan_sockets"] is not first["tcpwatch_orphan_sockets"]
    assert second["tcpwatch_orphan_sockets"].samples[0].value == 9
    assert second["tcpwatch_sysctl"] is first["tcpwatch_sysctl"]
    # a namespace more: every family that reads the namespaces runs again
    third = {m.name: m for m in memo.collect(_state((busy, POD), 2))}
    assert third["tcpwatch_sysctl"] is not second["tcpwatch_sysctl"]


def test_the_exposition_encodes_only_the_rebuilt_families(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: list[str] = []
    real = exposition._encode

    def counting(fmt: exposition.Format, families: object) -> bytes:
        chosen = list(families)  # type: ignore[call-overload]
        encoded.extend(m.name for m in chosen)
        return real(fmt, chosen)

    om = negotiate(OM)
    states = [_state((HOST,), n) for n in range(4)]
    expected_text = _fresh(states[1])
    expected_om = om.encode(make_registry(lambda: states[2], include_process=False))
    monkeypatch.setattr(exposition, "_encode", counting)
    memo = FamilyMemo()
    expositions = Expositions(memo.collect, CollectorRegistry())
    for fmt in (TEXT, om):
        expositions.render(states[0], fmt)
    everything = len(encoded)
    encoded.clear()
    body = b"".join(bytes(part) for part in expositions.render(states[1], TEXT))
    assert body == expected_text
    assert 0 < len(encoded) <= 6, encoded  # the rebuilt ones (and the empty self-metrics)
    assert len(encoded) < everything / 4
    # OpenMetrics was not asked for in states[1]: its bytes from states[0] still serve
    encoded.clear()
    expositions.render(states[2], om)
    assert 0 < len(encoded) <= 6, encoded
    parts = expositions.render(states[2], om)
    assert b"".join(bytes(part) for part in parts) == expected_om
