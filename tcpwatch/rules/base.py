"""The types every rule shares: thresholds, findings, the window a rule sees, and the rule itself.

Kept apart from ``tcpwatch.rules`` (which re-exports them) so the topic modules can import them
while the package builds its registry from those modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from tcpwatch.model import PersistedSysctl, Snapshot

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: Mapping[str, int] = MappingProxyType({"critical": 0, "warning": 1, "info": 2})
EvidenceValue = str | int | float
Thresholds = Mapping[str, float | None]


@dataclass(frozen=True, slots=True)
class Threshold:
    """One tunable of a rule, overridable in the config file as ``rules.<ID>.<name>``."""

    name: str
    default: float | None  # None = unset: the part of the rule that needs it stays silent
    minimum: float  # validation bounds, inclusive
    maximum: float
    unit: str  # "ratio" (0..1), "sockets", "seconds", "ports" ...: for docs and errors
    description: str


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong, in one network namespace, with the facts and the fix."""

    rule_id: str
    slug: str
    severity: Severity
    title: str  # one line about this case: "accept queue full on 0.0.0.0:8080 (nginx[1234])"
    netns: str
    subject: str  # what it is about: "0.0.0.0:8080", "nginx[1234]"; "" when namespace-wide
    evidence: Mapping[str, EvidenceValue]  # ordered facts; keys documented per rule
    remediation: str  # exact commands / config lines, one per line
    doc: str  # "docs/rules/Q01-accept-queue-full.md"


@dataclass(frozen=True, slots=True)
class Window:
    """What a rule sees: the snapshot now, the one at the start of the window, and history."""

    current: Snapshot
    previous: Snapshot | None  # None: no window, counters cannot be seen moving
    close_wait_first_seen: Mapping[int, float]  # CLOSE_WAIT inode -> unix time first seen
    persisted_sysctls: tuple[PersistedSysctl, ...]  # host-wide sysctl file lines

    @property
    def seconds(self) -> float | None:
        """Length of the window, None without a previous snapshot."""
        if self.previous is None:
            return None
        return max(self.current.taken_at - self.previous.taken_at, 0.0)

    def counter_delta(self, name: str) -> int | None:
        """How much a kernel counter grew during the window.

        None when it cannot be known: no previous snapshot, a counter source failed, the
        counter is missing, or it went backwards (the namespace was recreated).
        """
        if self.previous is None:
            return None
        now = self.current.counters
        before = self.previous.counters
        if now is None or before is None:
            return None
        end, start = now.get(name), before.get(name)
        if end is None or start is None or end < start:
            return None
        return end - start


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """A rule's settings from the config file."""

    enabled: bool = True
    thresholds: Mapping[str, float | None] = field(default_factory=dict)  # overrides only


CheckFunction = Callable[[Window, Thresholds], Iterable[Finding]]


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule: its identity, its tunables, what it reads, and the check that finds cases."""

    id: str
    slug: str
    severity: Severity  # the usual severity; a finding may be raised or lowered from it
    title: str
    thresholds: tuple[Threshold, ...]
    check: CheckFunction  # gets the defaults merged with the overrides
    doc: str
    sysctls: tuple[str, ...] = ()  # dotted names it reads: the sysctl source reads their union
    counters: tuple[str, ...] = ()  # nstat names of the kernel counters it reads

    def threshold_values(self, overrides: Mapping[str, float | None]) -> dict[str, float | None]:
        """Defaults, replaced by the overrides for names this rule knows."""
        values: dict[str, float | None] = {t.name: t.default for t in self.thresholds}
        for name, value in overrides.items():
            if name in values:
                values[name] = value
        return values

    def finding(
        self,
        window: Window,
        title: str,
        evidence: Mapping[str, EvidenceValue],
        remediation: str,
        subject: str = "",
        severity: Severity | None = None,
    ) -> Finding:
        """One case this rule found in ``window``'s namespace, at its usual severity by default."""
        return Finding(
            rule_id=self.id,
            slug=self.slug,
            severity=self.severity if severity is None else severity,
            title=title,
            netns=window.current.netns,
            subject=subject,
            evidence=MappingProxyType(dict(evidence)),
            remediation=remediation,
            doc=self.doc,
        )


def rule(
    rule_id: str,
    slug: str,
    severity: Severity,
    title: str,
    *,
    thresholds: tuple[Threshold, ...] = (),
    sysctls: tuple[str, ...] = (),
    counters: tuple[str, ...] = (),
) -> Callable[[CheckFunction], Rule]:
    """Declare a rule on its check function; the function's name then holds the :class:`Rule`.

    ``tcpwatch.rules`` collects every Rule defined in its topic modules, so declaring one here
    is all it takes to register it. The check makes findings with ``<name>.finding(...)``. The
    documentation page is ``docs/rules/<ID>-<slug>.md``.
    """

    def declare(check: CheckFunction) -> Rule:
        doc = f"docs/rules/{rule_id}-{slug}.md"
        return Rule(
            rule_id, slug, severity, title, thresholds, check, doc, tuple(sysctls), counters
        )

    return declare


def required(thresholds: Thresholds, name: str) -> float:
    """A threshold that has a default: its value (the engine merged defaults in)."""
    value = thresholds.get(name)
    if value is None:
        raise ValueError(f"threshold {name} has no value")
    return value
