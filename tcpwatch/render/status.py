"""The overall status of a set of findings, shared by the text and JSON reports.

It follows the Nagios plugin convention: OK, WARNING or CRITICAL and the exit code 0, 1 or 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from tcpwatch.rules import Finding, Severity, worst_exit_code

STATUS_BY_EXIT_CODE: Mapping[int, str] = MappingProxyType({0: "OK", 1: "WARNING", 2: "CRITICAL"})
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")


def status_of(findings: Iterable[Finding]) -> tuple[str, int]:
    """("CRITICAL", 2), ("WARNING", 1) or ("OK", 0)."""
    code = worst_exit_code(findings)
    return STATUS_BY_EXIT_CODE[code], code


def doc_url(doc: str, base: str) -> str:
    """A page's URL: ``base`` (config ``docs_url``) joined with its repository path
    (``docs/rules/Q01-accept-queue-full.md``)."""
    return f"{base.rstrip('/')}/{doc.lstrip('/')}"
