"""The `tcpwatch check` text report, for a person at 3 a.m.

Its first line follows the Nagios plugin convention (``TCPWATCH CRITICAL - 2 critical,
1 warning``); findings follow, grouped by severity, each with its evidence, the fix and the
documentation page. ANSI colour only when asked for. Names from the host or a daemon are escaped
(render/printable.py): the only escape sequences in the report are its own colours.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from tcpwatch.config import DEFAULT_DOCS_URL
from tcpwatch.escape import terminal
from tcpwatch.model import Snapshot
from tcpwatch.render.printable import printable_finding, printable_snapshot
from tcpwatch.render.scope import (
    Scope,
    checked_line,
    owners_line,
    privilege_note,
    verbose_lines,
)
from tcpwatch.render.status import (
    SEVERITIES,
    Gauges,
    doc_reference,
    doc_url,
    offline_page,
    status_of,
)
from tcpwatch.rules import Finding, sort_key

_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"
_COLOURS: Mapping[str, str] = MappingProxyType(
    {
        "critical": "\033[1;31m",  # bold red
        "warning": "\033[1;33m",  # bold yellow
        "info": "\033[1;36m",  # bold cyan
        "ok": "\033[1;32m",  # bold green
    }
)
_LABEL_WIDTH = 12


def summary_line(findings: Sequence[Finding], unknown: str | None = None) -> str:
    """The Nagios-style first line: ``TCPWATCH CRITICAL - 2 critical, 1 warning``; with
    ``unknown`` (why the check is incomplete), ``TCPWATCH UNKNOWN - <why> (1 warning)``."""
    counts = Counter(f.severity for f in findings)
    parts = [f"{counts[s]} {s}" for s in SEVERITIES if counts[s]]
    if unknown is not None:
        return f"TCPWATCH UNKNOWN - {terminal(unknown)}" + (
            f" ({', '.join(parts)})" if parts else ""
        )
    status, _ = status_of(findings)
    return f"TCPWATCH {status} - " + (", ".join(parts) if parts else "no findings")


def perfdata(
    findings: Sequence[Finding],
    snapshots: Sequence[Snapshot],
    fill_levels: tuple[float | None, float | None] = (None, None),
    gauges: Gauges | None = None,
) -> str:
    """Nagios performance data for the first line, after its ``|``.

    ``label=value[UOM];[warn];[crit];[min];[max]`` per the Nagios plugin guidelines: the
    findings by severity, then the gauges (:class:`Gauges`, from ``snapshots`` unless given:
    `check --from` has them from the daemon's report), each left out when it was not read: the
    fullest accept queue in percent (``fill_levels``, Q01's warning and critical ratios, as its
    warn and crit), and the CLOSE_WAIT, TIME_WAIT and orphaned sockets.
    """
    counts = Counter(f.severity for f in findings)
    parts = [f"{severity}={counts[severity]};;;0" for severity in SEVERITIES]
    seen = Gauges.of(snapshots) if gauges is None else gauges
    if seen.accept_queue_fill is not None:
        levels = ";".join("" if level is None else f"{level * 100:g}" for level in fill_levels)
        parts.append(f"accept_queue_fill={seen.accept_queue_fill * 100:.1f}%;{levels};0;100")
    for name in ("close_wait", "time_wait", "orphans"):
        value = getattr(seen, name)
        if value is not None:
            parts.append(f"{name}={value};;;0")
    return " ".join(parts)


def _paint(text: str, style: str, color: bool) -> str:
    return f"{style}{text}{_RESET}" if color and style else text


def _field(label: str, text: str) -> list[str]:
    """A labelled block; continuation lines aligned under the first."""
    indent = " " * (4 + _LABEL_WIDTH)
    lines = text.splitlines() or [""]
    first = f"    {label:<{_LABEL_WIDTH}}{lines[0]}"
    return [first, *(indent + line for line in lines[1:])]


def _format_value(value: str | int | float) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _doc(finding: Finding, docs_url: str) -> str:
    """The page online (when a docs_url is set) and how to read it offline."""
    return doc_reference(finding.rule_id, finding.doc, docs_url)


def _finding_lines(
    finding: Finding, color: bool, show_netns: bool, docs_url: str = DEFAULT_DOCS_URL
) -> list[str]:
    tag = _paint(f"[{finding.rule_id} {finding.slug}]", _COLOURS[finding.severity], color)
    lines = [f"  {tag} {_paint(finding.title, _BOLD, color)}"]
    if show_netns:
        lines += _field("netns", finding.netns)
    if finding.subject:
        lines += _field("subject", finding.subject)
    if finding.evidence:
        width = max(len(key) for key in finding.evidence)
        evidence = "\n".join(
            f"{key:<{width}}  {_format_value(value)}" for key, value in finding.evidence.items()
        )
        lines += _field("evidence", evidence)
    if finding.remediation:
        lines += _field("fix", finding.remediation)
    lines += _field("doc", _paint(_doc(finding, docs_url), _DIM, color))
    return lines


def _taken(snapshot: Snapshot) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot.taken_at))


def render_text(
    findings: Sequence[Finding],
    snapshots: Sequence[Snapshot],
    color: bool,
    verbose: bool = False,
    docs_url: str = DEFAULT_DOCS_URL,
    perf: str = "",
    unknown: str | None = None,
    scope: Scope | None = None,
) -> str:
    """The human report; ANSI colour only when ``color``; ``unknown``: why the check could not
    be completed (its status is then UNKNOWN, whatever the findings).

    With several namespaces, findings are grouped by namespace first, then by severity. Info
    findings are one line each (title and doc page) unless ``verbose``: they explain, they do not
    ask for action, and a node with a hundred listeners must not bury its one warning.
    ``perf`` (:func:`perfdata`) follows the first line's ``|``; ``docs_url`` is where the rule
    pages are (the config's ``docs_url``); ``scope``: what was checked, said under the status
    (render/scope.py).
    """
    # Every host or remote string escaped once, here: nothing below prints a control character.
    ordered = sorted(map(printable_finding, findings), key=sort_key)
    snapshots = [printable_snapshot(snapshot) for snapshot in snapshots]
    status, _ = status_of(ordered)
    first = summary_line(ordered, unknown)
    style = _COLOURS["ok"] if status == "OK" else _COLOURS[status.lower()]
    if unknown is not None:
        style = _COLOURS["warning"]
    lines = [_paint(first, style, color) + (f" | {perf}" if perf else "")]
    if scope is not None:
        lines.append(checked_line(snapshots, scope))
    for snapshot in snapshots:
        ok = sum(1 for s in snapshot.sources if s.ok)
        failed = len(snapshot.sources) - ok
        degraded = sum(1 for s in snapshot.sources if s.ok and s.skipped)
        lines.append(
            f"netns {snapshot.netns}: snapshot at {_taken(snapshot)}, "
            f"sources {ok} ok"
            + (f" ({degraded} degraded)" if degraded else "")
            + (f", {failed} failed" if failed else "")
        )
        if verbose:
            lines.extend(verbose_lines(snapshot))
    if scope is not None and (owners := owners_line(snapshots, scope, verbose)) is not None:
        lines.append(owners)
    privileged = scope is not None and scope.privileged
    if (note := privilege_note(snapshots, privileged)) is not None:
        lines.append(_paint("! " + note, _COLOURS["warning"], color))
    for snapshot in snapshots:
        for source in snapshot.sources:
            if source.ok and source.skipped:
                message = (
                    f"source {source.name} degraded in netns {snapshot.netns}: left out "
                    f"{len(source.skipped)} field(s): {'; '.join(source.skipped[:3])}"
                )
                lines.append(_paint("! " + message, _COLOURS["warning"], color))
            if not source.ok:
                message = (
                    f"source {source.name} failed in netns {snapshot.netns} "
                    f"({source.duration_seconds:.3f} s): {source.error or 'unknown error'}; "
                    "rules that need it were skipped"
                )
                lines.append(_paint("! " + message, _COLOURS["warning"], color))
    namespaces = list(dict.fromkeys([s.netns for s in snapshots] + [f.netns for f in ordered]))
    grouped = len(namespaces) > 1
    for netns in namespaces if grouped else [None]:
        in_netns = [f for f in ordered if netns is None or f.netns == netns]
        if grouped:
            lines.append("")
            lines.append(_paint(f"== netns {netns}: {summary_line(in_netns)}", _BOLD, color))
        for severity in SEVERITIES:
            group = [f for f in in_netns if f.severity == severity]
            if not group:
                continue
            lines.append("")
            lines.append(_paint(f"{severity.upper()} ({len(group)})", _COLOURS[severity], color))
            if severity == "info" and not verbose:
                lines.extend(_info_line(finding, color, docs_url) for finding in group)
                continue
            for index, finding in enumerate(group):
                if index:
                    lines.append("")
                lines.extend(_finding_lines(finding, color, False, docs_url))
    return "\n".join(lines) + "\n"


def _info_line(finding: Finding, color: bool, docs_url: str) -> str:
    tag = _paint(f"[{finding.rule_id} {finding.slug}]", _COLOURS[finding.severity], color)
    page = doc_url(finding.doc, docs_url) or offline_page(finding.rule_id)
    return f"  {tag} {finding.title}  {_paint(page, _DIM, color)}"
