"""Findings and snapshots with every string escaped for a terminal (tcpwatch/escape.py).

The text report and the sysctl snippet print names from the host (processes, namespaces, files)
and, with ``check --from``, whatever a daemon answered. They render these copies, so no
renderer has to remember which field may hold a control character. The fix text keeps its own
line structure: each of its lines is escaped on its own, so a carriage return, a vertical tab
or NEL inside a line cannot start a new one (``str.splitlines`` would split on them).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from tcpwatch.escape import terminal
from tcpwatch.model import Snapshot, SourceStatus
from tcpwatch.rules import EvidenceValue, Finding


def lines_of(text: str) -> list[str]:
    """``text`` split at its newlines only, each line escaped."""
    return [terminal(line) for line in text.split("\n")]


def printable_finding(finding: Finding) -> Finding:
    evidence: dict[str, EvidenceValue] = {
        terminal(key): terminal(value) if isinstance(value, str) else value
        for key, value in finding.evidence.items()
    }
    return replace(
        finding,
        rule_id=terminal(finding.rule_id),
        slug=terminal(finding.slug),
        title=terminal(finding.title),
        netns=terminal(finding.netns),
        subject=terminal(finding.subject),
        evidence=MappingProxyType(evidence),
        remediation="\n".join(lines_of(finding.remediation)),
        doc=terminal(finding.doc),
    )


def _printable_source(source: SourceStatus) -> SourceStatus:
    return replace(
        source,
        name=terminal(source.name),
        error=None if source.error is None else terminal(source.error),
        skipped=tuple(terminal(note) for note in source.skipped),
    )


def printable_snapshot(snapshot: Snapshot) -> Snapshot:
    """The fields the reports print (namespace name, sources), escaped."""
    return replace(
        snapshot,
        netns=terminal(snapshot.netns),
        sources=tuple(_printable_source(source) for source in snapshot.sources),
    )
