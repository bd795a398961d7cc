"""The rule registry and engine: Snapshot(s) in, Findings out.

Each rule is a pure function over a :class:`Window` (the snapshot now, the one at the start of
the window, CLOSE_WAIT history and the persisted sysctl lines) and its thresholds, declared with
:func:`~tcpwatch.rules.base.rule` in a topic module of this package. Nothing here is hand-kept:
:data:`RULES` is every rule the package's modules declare (found by importing them, as the
source registry does), and :data:`SYSCTLS_USED` what they declare to read. A topic module takes
its helpers from the bottom modules (``base``, ``fixes``, ``shapes``, ``shared``, ``peers``),
never from another topic module. ``evaluate`` runs every enabled rule; one that raises becomes a
single ``warning`` finding for that rule (its condition went unchecked, which the operator must
know, but it is no evidence of a network problem, so it does not page as critical) and the
others still run.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType, ModuleType

from tcpwatch.rules.base import (
    SEVERITY_RANK,
    EvidenceValue,
    Finding,
    Rule,
    RuleSettings,
    Severity,
    Threshold,
    Thresholds,
    Window,
)

__all__ = [
    "ERROR_SEVERITY",
    "RULES",
    "SYSCTLS_USED",
    "EvidenceValue",
    "Finding",
    "Rule",
    "RuleSettings",
    "Severity",
    "Threshold",
    "Thresholds",
    "Window",
    "evaluate",
    "rule_by_id",
    "sort_key",
    "worst_exit_code",
]

log = logging.getLogger(__name__)


def package_modules() -> list[ModuleType]:
    """Every module of this package, imported (the topic modules declare the rules)."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]


def collect(modules: Iterable[ModuleType]) -> tuple[Rule, ...]:
    """Every :class:`Rule` defined at the top level of ``modules``, in id order.

    A rule imported into another module is the same object and counts once; two different rules
    with one id are a programming error, caught at import.
    """
    found: dict[str, Rule] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Rule) and found.setdefault(value.id, value) is not value:
                raise RuntimeError(f"two rules are declared with the id {value.id}")
    return tuple(sorted(found.values(), key=lambda r: r.id))


RULES: tuple[Rule, ...] = collect(package_modules())
ERROR_SEVERITY: Severity = "warning"

# Every sysctl a rule reads: the sysctl source must try each (absent ones are simply missing).
SYSCTLS_USED: tuple[str, ...] = tuple(sorted({name for r in RULES for name in r.sysctls}))


def rule_by_id(rule_id: str) -> Rule | None:
    return next((rule for rule in RULES if rule.id == rule_id), None)


def sort_key(finding: Finding) -> tuple[int, str, str, str]:
    """The one order of findings everywhere: critical first, then by namespace, rule id and
    subject (so a namespace's findings stay together)."""
    return (SEVERITY_RANK[finding.severity], finding.netns, finding.rule_id, finding.subject)


def _error_finding(rule: Rule, window: Window, error: Exception) -> Finding:
    described = f"{type(error).__name__}: {error}"
    return Finding(
        rule_id=rule.id,
        slug=rule.slug,
        severity=ERROR_SEVERITY,
        title=f"rule {rule.id} ({rule.slug}) could not run: {described}",
        netns=window.current.netns,
        subject="",
        evidence=MappingProxyType({"error": described, "rule_title": rule.title}),
        remediation="tcpwatch failed to evaluate this rule, so its condition went unchecked "
        "here.\nRun `tcpwatch check --log-level debug` to see the traceback, and report it as a "
        "tcpwatch bug with that output.",
        doc=rule.doc,
    )


def evaluate(
    window: Window,
    settings: Mapping[str, RuleSettings],
    rules: Sequence[Rule] = RULES,
) -> list[Finding]:
    """Run every enabled rule over one namespace's window; findings sorted by :func:`sort_key`."""
    findings: list[Finding] = []
    for rule in rules:
        setting = settings.get(rule.id)
        if setting is not None and not setting.enabled:
            continue
        overrides = setting.thresholds if setting is not None else {}
        try:
            # list() so a rule failing half-way contributes only its error finding.
            findings.extend(list(rule.check(window, rule.threshold_values(overrides))))
        except Exception as error:  # one broken rule must never abort the run
            # The error finding reports it (check's report, serve's tcpwatch_finding); a log line
            # here would repeat on every poll of the daemon.
            netns = window.current.netns
            log.debug("rule %s failed in netns %s: %s", rule.id, netns, error, exc_info=True)
            findings.append(_error_finding(rule, window, error))
    findings.sort(key=sort_key)
    return findings


def worst_exit_code(findings: Iterable[Finding]) -> int:
    """Nagios plugin convention: 0 nothing above info, 1 a warning, 2 a critical."""
    code = 0
    for finding in findings:
        if finding.severity == "critical":
            return 2
        if finding.severity == "warning":
            code = 1
    return code
