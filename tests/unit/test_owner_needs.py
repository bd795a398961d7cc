"""Which owners check looks for (tcpwatch/owner_needs.py): what the rules read, on built snapshots.

The property that matters: the findings over an attribution holding only the owners the rules
asked for are the findings over the full one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from tcpwatch.audit import audit
from tcpwatch.model import ProcessRef, Snapshot
from tcpwatch.owner_needs import AskedOwners, asked_owners
from tcpwatch.rules import RuleSettings
from tests.unit.snapshots import DEFAULT_OWNERS, listener, owner_process, snapshot, socket_table

LEAKY = ProcessRef(2200, "leaky-worker")
BACKEND = ProcessRef(3100, "backend")
NO_Q05 = {"Q05": RuleSettings(enabled=False)}
LISTENERS = frozenset(DEFAULT_OWNERS)


def leaking(held: int, processes: int = 1, name: str = "leaky-worker") -> Snapshot:
    """``held`` CLOSE_WAIT sockets spread over ``processes`` processes named ``name``."""
    inodes = list(range(100_000, 100_000 + held))
    owners = dict(DEFAULT_OWNERS)
    owners |= {inode: ProcessRef(2200 + n % processes, name) for n, inode in enumerate(inodes)}
    return snapshot(sockets=socket_table(close_wait_inodes=inodes), owners=owners)


def narrowed(current: Snapshot, asked: frozenset[int]) -> Snapshot:
    """``current`` as check sees it after looking only for ``asked``."""
    assert current.attribution is not None
    owners = {i: o for i, o in current.attribution.owners.items() if i in asked}
    return replace(current, attribution=replace(current.attribution, owners=owners))


def asked(current: Snapshot, settings: Mapping[str, RuleSettings] | None = None) -> frozenset[int]:
    found = asked_owners([current], {}, settings or {}, {})
    assert found is not None
    return found


def same_findings(current: Snapshot, settings: Mapping[str, RuleSettings] | None = None) -> None:
    rules = settings or {}
    wanted = asked(current, rules)
    full = audit([current], {}, rules)
    assert audit([narrowed(current, wanted)], {}, rules) == full
    # What check does: the first question is asked with no owner known yet.
    assert asked(replace(current, attribution=None), rules) == wanted


def test_the_probe_notes_every_lookup_and_a_listing_asks_for_everything() -> None:
    probe = AskedOwners({7: LEAKY})
    assert probe.get(7) == LEAKY
    assert probe.get(8) is None
    assert 9 not in probe
    assert probe[7] == LEAKY
    assert probe.asked == {7, 8, 9}
    assert not probe.everything
    assert list(probe) == [7]
    assert probe.everything


def test_below_s01s_threshold_no_close_wait_owner_is_asked_for() -> None:
    # 49 CLOSE_WAIT sockets in all: no process (nor program) can hold the 50 S01 warns at.
    current = leaking(49)
    wanted = asked(current)
    assert wanted == LISTENERS  # Q05 judges every listener's owner
    same_findings(current)


def test_at_s01s_threshold_every_close_wait_owner_is_asked_for() -> None:
    current = leaking(50, processes=5)  # 10 each: S01 judges the program, all five processes
    assert current.sockets is not None
    wanted = asked(current)
    assert wanted == LISTENERS | current.sockets.inodes_by_state["close_wait"]
    (finding,) = [f for f in audit([narrowed(current, wanted)], {}, {}) if f.rule_id == "S01"]
    assert finding.evidence["processes"] == 5
    same_findings(current)


def test_with_a_window_only_the_lasting_close_wait_sockets_count_towards_the_threshold() -> None:
    current = leaking(60)
    assert current.sockets is not None
    inodes = sorted(current.sockets.inodes_by_state["close_wait"])
    start = replace(current, sockets=socket_table(close_wait_inodes=inodes[:40]))
    found = asked_owners([current], {current.netns: start}, {}, {})
    assert found == LISTENERS  # 40 lasted through the window: below 50
    start = replace(current, sockets=socket_table(close_wait_inodes=inodes[:50]))
    found = asked_owners([current], {current.netns: start}, {}, {})
    assert found is not None and found > LISTENERS


def test_without_q05_only_the_flagged_listener_is_asked_for() -> None:
    full_queue = listener(8080, queue_length=511, queue_max=511, inode=5004)
    owners = {**DEFAULT_OWNERS, 5004: BACKEND}
    listeners = (*socket_table().listeners, full_queue)
    current = snapshot(sockets=socket_table(listeners=listeners), owners=owners)
    assert asked(current, NO_Q05) == {5004}
    assert asked(current) == LISTENERS | {5004}
    same_findings(current, NO_Q05)
    same_findings(current)


def test_q05_asks_for_every_listener_even_before_its_owners_are_described() -> None:
    # Q05 reads the owners source's descriptions of the listeners' owners, which do not exist
    # yet when check asks: the probe gives it an empty description, so it still goes through
    # every listener.
    described = [owner_process(1234, "nginx", open_fds=1000, max_fds=1024)]
    current = snapshot(described=described)
    assert asked(replace(current, owner_processes=None)) == LISTENERS
    findings = audit([narrowed(current, LISTENERS)], {}, {})
    assert [f.rule_id for f in findings if f.rule_id == "Q05"] == ["Q05"]
    same_findings(current)


def test_a_healthy_host_without_q05_needs_no_owner() -> None:
    assert asked(snapshot(), NO_Q05) == frozenset()


def test_every_namespace_is_asked_about() -> None:
    inside = replace(leaking(55), netns="ns-a")
    found = asked_owners([snapshot(), inside], {}, {}, {})
    assert inside.sockets is not None
    assert found == LISTENERS | inside.sockets.inodes_by_state["close_wait"]
