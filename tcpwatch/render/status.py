"""The overall status of a set of findings, shared by the text and JSON reports.

It follows the Nagios plugin convention: OK, WARNING or CRITICAL and the exit code 0, 1 or 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tcpwatch.model import Snapshot
from tcpwatch.rules import Finding, Severity, worst_exit_code

STATUS_BY_EXIT_CODE: Mapping[int, str] = MappingProxyType({0: "OK", 1: "WARNING", 2: "CRITICAL"})
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")


def status_of(findings: Iterable[Finding]) -> tuple[str, int]:
    """("CRITICAL", 2), ("WARNING", 1) or ("OK", 0)."""
    code = worst_exit_code(findings)
    return STATUS_BY_EXIT_CODE[code], code


def doc_url(doc: str, base: str) -> str | None:
    """A page's URL: ``base`` (config ``docs_url``) joined with its repository path
    (``docs/rules/Q01-accept-queue-full.md``); None when no docs_url is configured."""
    if not base:
        return None
    return f"{base.rstrip('/')}/{doc.lstrip('/')}"


def offline_page(rule_id: str) -> str:
    """The command that prints a rule's page from the installed copy."""
    return f"tcpwatch rules {rule_id}"


def doc_reference(rule_id: str, doc: str, base: str) -> str:
    """Where a person reads a rule's page: the published copy and the offline command when a
    docs_url is configured, else the offline command alone (never a link to nowhere)."""
    url = doc_url(doc, base)
    offline = offline_page(rule_id)
    return f"{url} (offline: {offline})" if url else offline


@dataclass(frozen=True, slots=True)
class Gauges:
    """The numbers check's perfdata reports beside the findings, over every namespace polled;
    None when what they come from was not read. Also in the JSON report, so `check --from`
    prints the same perfdata as a direct check."""

    accept_queue_fill: float | None = None  # the fullest listener's queue length / backlog
    close_wait: int | None = None
    time_wait: int | None = None
    orphans: int | None = None

    @classmethod
    def of(cls, snapshots: Sequence[Snapshot]) -> Gauges:
        tables = [s.sockets for s in snapshots if s.sockets is not None]
        stats = [s.sockstat for s in snapshots if s.sockstat is not None]
        fill = close_wait = time_wait = orphans = None
        if tables:
            fills = [
                lsn.queue_length / lsn.queue_max
                for table in tables
                for lsn in table.listeners
                if lsn.queue_max > 0
            ]
            fill = max(fills, default=0.0)
            close_wait = sum(t.total("close_wait") for t in tables)
        if stats:
            time_wait = sum(s.time_wait for s in stats)
            orphans = sum(s.orphan for s in stats)
        return cls(fill, close_wait, time_wait, orphans)

    @classmethod
    def from_json(cls, raw: object) -> Gauges:
        """The report's ``gauges`` object; missing or malformed values count as not read."""
        values = raw if isinstance(raw, Mapping) else {}

        def number(key: str) -> float | None:
            value = values.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            return float(value)

        def count(key: str) -> int | None:
            value = number(key)
            return None if value is None else int(value)

        return cls(
            number("accept_queue_fill"), count("close_wait"), count("time_wait"), count("orphans")
        )

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "accept_queue_fill": self.accept_queue_fill,
            "close_wait": self.close_wait,
            "time_wait": self.time_wait,
            "orphans": self.orphans,
        }
