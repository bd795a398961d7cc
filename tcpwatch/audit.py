"""Snapshots of every polled namespace -> findings: one Window per namespace, evaluated alike.

Between polls of a namespace where nothing changed, most rules would find what they found last
time. A :class:`RuleMemo` (serve's pipeline keeps one) reuses a rule's last findings when it can
prove they are the same: the rule read, through its Window, only ``current`` and
``persisted_sysctls`` (recorded on each run, so a rule that reads the window's start, its length,
a counter's growth or the CLOSE_WAIT first-seen times only on some inputs is recorded doing so on
those), this namespace's snapshot equals the one it ran on in everything but its time and its
sources' durations, the persisted lines are equal, and its settings too. A rule is a pure
function of its window, so it would return the same. Every rule that looked at time (the counter
rules over ``rules.window``, S01's CLOSE_WAIT ages) runs on every poll: a window rolling over,
or a socket growing old, with nothing else changing, still shows at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tcpwatch.config import Config
from tcpwatch.model import PersistedSysctl, Snapshot
from tcpwatch.reads import ReadSnapshot, read_snapshot, same
from tcpwatch.rules import RULES, Finding, Rule, RuleSettings, Window, evaluate, sort_key

# What a rule may read of its Window and still be reused: what the snapshot holds, not when.
_TIMELESS = frozenset({"current", "persisted_sysctls"})
_WINDOW_FIELDS = frozenset(f.name for f in fields(Window)) | {"seconds", "counter_delta"}
# What a reused rule may have read of the snapshot: its data, and its sources' outcomes
# (compared without their durations). Not ``taken_at``: a rule that reads it runs every poll.
_DATA_FIELDS = frozenset(f.name for f in fields(Snapshot)) - {"taken_at"}
_SNAPSHOT_READS = _DATA_FIELDS | {"source_ok"}


def rule_settings(config: Config) -> dict[str, RuleSettings]:
    return {
        rule_id: RuleSettings(enabled=override.enabled, thresholds=dict(override.thresholds))
        for rule_id, override in config.rules.items()
    }


class _ReadWindow(Window):
    """A Window that notes which of its fields and properties a rule read."""

    __slots__ = ("reads",)

    def __getattribute__(self, name: str) -> Any:
        if name in _WINDOW_FIELDS:
            object.__getattribute__(self, "reads").add(name)
        return object.__getattribute__(self, name)


def _reading(window: Window) -> tuple[_ReadWindow, ReadSnapshot]:
    snapshot = read_snapshot(window.current)
    recording = _ReadWindow(
        snapshot, window.previous, window.close_wait_first_seen, window.persisted_sysctls
    )
    object.__setattr__(recording, "reads", set())
    return recording, snapshot


def _same(name: str, a: Snapshot, b: Snapshot) -> bool:
    if name == "sources":
        return [(s.name, s.ok, s.error, s.skipped) for s in a.sources] == [
            (s.name, s.ok, s.error, s.skipped) for s in b.sources
        ]
    if name == "source_ok":
        return True  # it reads ``sources``, noted and compared on its own
    return same(getattr(a, name), getattr(b, name))


@dataclass(frozen=True, slots=True)
class _Result:
    setting: RuleSettings
    reads: frozenset[str]  # the snapshot's fields it read
    persisted: bool  # whether it read the persisted sysctl lines
    findings: tuple[Finding, ...]


@dataclass(frozen=True, slots=True)
class _Kept:
    current: Snapshot
    persisted: tuple[PersistedSysctl, ...]
    results: Mapping[str, _Result]  # rule id -> what it read and found, reusable rules only


def _reusable(last: _Result, kept: _Kept, window: Window, setting: RuleSettings) -> bool:
    if last.setting != setting:
        return False
    if kept.current.identity != window.current.identity:
        return False
    if last.persisted and kept.persisted != window.persisted_sysctls:
        return False
    return all(_same(name, kept.current, window.current) for name in last.reads)


class RuleMemo:
    """The rules' last findings per namespace, for the rules that may be reused (see above)."""

    def __init__(self, rules: Sequence[Rule] = RULES) -> None:
        self._rules = tuple(rules)
        self._kept: dict[str, _Kept] = {}
        self.runs = 0  # rules run, not reused (tests, profiles)

    def evaluate(self, window: Window, settings: Mapping[str, RuleSettings]) -> list[Finding]:
        netns = window.current.netns
        kept = self._kept.get(netns)
        results: dict[str, _Result] = {}
        findings: list[Finding] = []
        reading: tuple[_ReadWindow, ReadSnapshot] | None = None
        for rule in self._rules:
            setting = settings.get(rule.id, RuleSettings())
            if not setting.enabled:
                continue
            last = kept.results.get(rule.id) if kept is not None else None
            if last is not None and kept is not None and _reusable(last, kept, window, setting):
                results[rule.id] = last
                findings.extend(last.findings)
                continue
            reading = reading or _reading(window)
            recording, snapshot = reading
            recording.reads.clear()
            snapshot.reads.clear()
            found = tuple(evaluate(recording, settings, (rule,)))
            self.runs += 1
            findings.extend(found)
            if recording.reads <= _TIMELESS and snapshot.reads <= _SNAPSHOT_READS:
                read = frozenset(snapshot.reads)
                persisted = "persisted_sysctls" in recording.reads
                results[rule.id] = _Result(setting, read, persisted, found)
        self._kept[netns] = _Kept(window.current, window.persisted_sysctls, results)
        findings.sort(key=sort_key)
        return findings

    def keep_only(self, netns: set[str]) -> None:
        """Forget the namespaces not polled any more."""
        self._kept = {name: kept for name, kept in self._kept.items() if name in netns}


def audit(
    current: Sequence[Snapshot],
    previous: Mapping[str, Snapshot],
    settings: Mapping[str, RuleSettings],
    close_wait_first_seen: Mapping[str, Mapping[int, float]] | None = None,
    memo: RuleMemo | None = None,
) -> list[Finding]:
    """Evaluate the rules in each namespace against its own earlier snapshot (by netns name).

    /etc/sysctl* lines (the ``sysctl_files`` source, in every snapshot) are the host's: only the
    host namespace (or the only one polled) is judged against them. With ``memo`` (serve), a
    rule whose findings cannot have changed since the last poll is not run again.
    """
    findings: list[Finding] = []
    first_seen = close_wait_first_seen or {}
    for snapshot in current:
        host_like = snapshot.netns == "host" or len(current) == 1
        before = previous.get(snapshot.netns)
        if before is not None and before.identity.inode != snapshot.identity.inode:
            before = None  # same name, new namespace (a re-created pod): nothing to compare
        window = Window(
            current=snapshot,
            previous=before,
            close_wait_first_seen=first_seen.get(snapshot.netns, {}),
            persisted_sysctls=(snapshot.persisted_sysctls or ()) if host_like else (),
        )
        if memo is not None:
            findings.extend(memo.evaluate(window, settings))
        else:
            findings.extend(evaluate(window, settings))
    if memo is not None:
        memo.keep_only({snapshot.netns for snapshot in current})
    findings.sort(key=sort_key)
    return findings
