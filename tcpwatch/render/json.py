"""The `tcpwatch check --format json` report, for programs.

The schema is documented in docs/check-json.md and versioned by ``schema_version``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, cast

from tcpwatch.config import DEFAULT_DOCS_URL
from tcpwatch.jsonshape import Shape, ShapeError
from tcpwatch.model import STATES, Snapshot
from tcpwatch.render.scope import Scope, owners_of, privilege_note
from tcpwatch.render.status import SEVERITIES, Gauges, doc_url, status_of
from tcpwatch.rules import EvidenceValue, Finding, Severity, sort_key
from tcpwatch.rules.shapes import counter_key

# 2: every evidence key is snake_case; kernel counters' keys changed (docs/check-json.md).
SCHEMA_VERSION = 2
EXIT_UNKNOWN = 3  # Nagios: the check could not be done (cli_parser.EXIT_UNKNOWN, one layer up)
READABLE_VERSIONS = (1, 2)  # findings_from_document translates a version 1 report's keys
_V1_COUNTER = re.compile(r"(TcpExt[A-Za-z]+)_(in_window|total)")


def finding_to_json(finding: Finding, docs_url: str = DEFAULT_DOCS_URL) -> dict[str, Any]:
    return {
        "id": finding.rule_id,
        "slug": finding.slug,
        "severity": finding.severity,
        "title": finding.title,
        "netns": finding.netns,
        "subject": finding.subject,
        "evidence": dict(finding.evidence),
        "remediation": finding.remediation,
        "doc": finding.doc,
        "doc_url": doc_url(finding.doc, docs_url),
    }


def render_json(
    findings: Sequence[Finding],
    snapshots: Sequence[Snapshot],
    window_seconds: float,
    docs_url: str = DEFAULT_DOCS_URL,
    unknown: str | None = None,
    scope: Scope | None = None,
) -> str:
    """The machine report (schema in docs/check-json.md), one JSON document and a newline.
    ``scope``: what `check` covered (rules evaluated, privilege), said as the text report does."""
    document = report_document(
        findings, snapshots, window_seconds, docs_url=docs_url, unknown=unknown
    )
    if scope is not None:
        document["checked"] = checked_of(snapshots, scope)
    return json.dumps(document, indent=2) + "\n"


def checked_of(snapshots: Sequence[Snapshot], scope: Scope) -> dict[str, Any]:
    """What a check covered: its rules and why owners went unnamed; from a daemon
    (``scope.daemon``), its URL, the rules and owners being the daemon's (not known here)."""
    if scope.daemon:
        return {"daemon": scope.daemon, "rules": None, "owners_note": None, "owners": None}
    return {
        "daemon": None,
        "rules": scope.rules,
        "owners_note": privilege_note(snapshots, scope.privileged),
        "owners": owners_of(snapshots, scope),
    }


def _namespace(snapshot: Snapshot) -> dict[str, Any]:
    """A checked namespace: when, and what its socket table held (null when it was not read)."""
    table = snapshot.sockets
    return {
        "netns": snapshot.netns,
        "taken_at": snapshot.taken_at,
        "listeners": None if table is None else len(table.listeners),
        "sockets": None if table is None else sum(table.total(state) for state in STATES),
    }


def report_document(
    findings: Sequence[Finding],
    snapshots: Sequence[Snapshot],
    window_seconds: float,
    limit: int | None = None,
    docs_url: str = DEFAULT_DOCS_URL,
    unknown: str | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict. ``limit`` cuts the findings list (the daemon's API);
    status, exit code and summary still count every finding, and ``findings_total`` says how
    many there were when the list was cut. ``unknown``: why the check could not be completed
    (status UNKNOWN, exit code 3, the reason in ``error``), with whatever it found so far."""
    ordered = sorted(findings, key=sort_key)
    status, code = status_of(ordered)
    if unknown is not None:
        status, code = "UNKNOWN", EXIT_UNKNOWN
    counts = Counter(f.severity for f in ordered)
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "exit_code": code,
        "summary": {severity: counts[severity] for severity in SEVERITIES},
        "window_seconds": window_seconds,
        "namespaces": [_namespace(snapshot) for snapshot in snapshots],
        "findings": [finding_to_json(finding, docs_url) for finding in ordered[:limit]],
        "gauges": Gauges.of(snapshots).to_json(),
        "sources": [
            {
                "netns": snapshot.netns,
                "name": source.name,
                "ok": source.ok,
                "duration_seconds": source.duration_seconds,
                "error": source.error,
                "skipped": list(source.skipped),
            }
            for snapshot in snapshots
            for source in snapshot.sources
        ],
    }
    if limit is not None and len(ordered) > limit:
        document["findings_total"] = len(ordered)
    if unknown is not None:
        document["error"] = unknown
    return document


def findings_from_json(text: str) -> list[Finding]:
    """The findings of a render_json document, as Finding objects (for tests and tooling)."""
    return findings_from_document(json.loads(text))


def findings_from_document(document: Any) -> list[Finding]:
    """The findings of a report document (parsed JSON), every field's type checked; ShapeError
    (a ValueError) naming the first field that is wrong when it is not one."""
    root = Shape(document)
    if not isinstance(document, dict):
        raise root.fail("a check report (a JSON object)")
    version = root.field("schema_version").integer()
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise ShapeError(f"schema_version: {version} is not one this tcpwatch reads ({readable})")
    return [_finding(item, version) for item in root.field("findings").items()]


def _finding(item: Shape, version: int) -> Finding:
    evidence = {key: value.scalar() for key, value in item.field("evidence").members()}
    return Finding(
        rule_id=item.field("id").string(),
        slug=item.field("slug").string(),
        severity=cast(Severity, item.field("severity").choice(SEVERITIES)),
        title=item.field("title").string(),
        netns=item.field("netns").string(),
        subject=item.field("subject").string(),
        evidence=MappingProxyType(evidence if version == SCHEMA_VERSION else _v1(evidence)),
        remediation=item.field("remediation").string(),
        doc=item.field("doc").string(),
    )


def _v1(evidence: dict[str, EvidenceValue]) -> dict[str, EvidenceValue]:
    """A version 1 report's evidence under version 2 keys (TcpExtListenOverflows_in_window ->
    listen_overflows_in_window); every other key was already snake_case."""
    renamed: dict[str, EvidenceValue] = {}
    for key, value in evidence.items():
        old = _V1_COUNTER.fullmatch(key)
        renamed[f"{counter_key(old[1])}_{old[2]}" if old else key] = value
    return renamed
