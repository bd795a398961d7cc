"""The `tcpwatch check --format json` report, for programs.

The schema is documented in docs/check-json.md and versioned by ``schema_version``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from tcpwatch.model import Snapshot
from tcpwatch.render.status import SEVERITIES, status_of
from tcpwatch.rules import Finding, sort_key

SCHEMA_VERSION = 1


def finding_to_json(finding: Finding) -> dict[str, Any]:
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
    }


def render_json(
    findings: Sequence[Finding], snapshots: Sequence[Snapshot], window_seconds: float
) -> str:
    """The machine report (schema in docs/check-json.md), one JSON document and a newline."""
    ordered = sorted(findings, key=sort_key)
    status, code = status_of(ordered)
    counts = Counter(f.severity for f in ordered)
    document = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "exit_code": code,
        "summary": {severity: counts[severity] for severity in SEVERITIES},
        "window_seconds": window_seconds,
        "namespaces": [
            {"netns": snapshot.netns, "taken_at": snapshot.taken_at} for snapshot in snapshots
        ],
        "findings": [finding_to_json(finding) for finding in ordered],
        "sources": [
            {
                "netns": snapshot.netns,
                "name": source.name,
                "ok": source.ok,
                "duration_seconds": source.duration_seconds,
                "error": source.error,
            }
            for snapshot in snapshots
            for source in snapshot.sources
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def findings_from_json(text: str) -> list[Finding]:
    """The findings of a render_json document, as Finding objects (for tests and tooling)."""
    document = json.loads(text)
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"unsupported check report schema_version {version!r}")
    return [
        Finding(
            rule_id=item["id"],
            slug=item["slug"],
            severity=item["severity"],
            title=item["title"],
            netns=item["netns"],
            subject=item["subject"],
            evidence=MappingProxyType(dict(item["evidence"])),
            remediation=item["remediation"],
            doc=item["doc"],
        )
        for item in document["findings"]
    ]
