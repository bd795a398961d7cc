"""The page at / of `tcpwatch serve`: version, configuration, the latest poll, active findings.

Everything shown that comes from the host (process names, addresses, errors) is escaped.
"""

from __future__ import annotations

import html
import time

from tcpwatch import __version__
from tcpwatch.config import Config
from tcpwatch.state import ExportState


def landing_page(
    state: ExportState | None, config: Config, listening_on: str, web_summary: str, now: float
) -> str:
    """The page at /: version, configuration, the latest poll, active findings, links.

    ``web_summary`` says what the web config turns on (``WebConfig.summary()``).
    """
    e = html.escape
    collect = config.collect
    attribution = (
        f"on ({', '.join(collect.attribute_states) or 'listeners only'}; scan timeout "
        f"{collect.process_scan_timeout:g} s)"
        if collect.process_attribution
        else "off"
    )
    overrides = []
    for rule_id, override in sorted(config.rules.items()):
        if not override.enabled:
            overrides.append(f"{rule_id} disabled")
        for name, value in sorted(override.thresholds.items()):
            overrides.append(f"{rule_id}.{name} = {'unset' if value is None else f'{value:g}'}")
    settings = [
        ("Configuration file", config.source),
        ("Listening on", f"{listening_on or config.listen} ({web_summary})"),
        ("Web config", config.web_config or "none"),
        ("Poll interval", f"{config.interval:g} s"),
        ("Namespaces", ", ".join(config.namespaces)),
        ("procfs", config.procfs),
        ("ESTABLISHED counted", collect.established),
        ("Process attribution", attribution),
        ("Top N", f"{collect.top_processes} processes, {collect.top_destinations} destinations"),
        ("Rule overrides", "; ".join(overrides) or "none (defaults)"),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in settings)
    if state is None:
        poll = "<p>The first poll has not finished yet.</p>"
        findings = ""
    else:
        age = max(now - state.last_poll, 0.0)
        failing = [
            f"{status.name} in {snap.netns}: {status.error}"
            for snap in state.snapshots
            for status in snap.sources
            if not status.ok
        ]
        sources = (
            "<ul>" + "".join(f"<li>{e(text)}</li>" for text in failing) + "</ul>"
            if failing
            else "<p>Every source worked.</p>"
        )
        poll = (
            f"<p>Latest poll {age:.0f} s ago, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(state.last_poll))}; "
            f"namespaces: {e(', '.join(s.netns for s in state.snapshots))}.</p>"
            f"<h3>Failing sources</h3>{sources}"
        )
        findings = _findings_html(state)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>tcpwatch</title>'
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}th,td{text-align:left;padding:.2em .8em;"
        "border-bottom:1px solid #ddd;vertical-align:top}pre{margin:0;white-space:pre-wrap}"
        ".critical{color:#b00}.warning{color:#a60}</style></head><body>"
        f"<h1>tcpwatch {e(__version__)}</h1>"
        "<p>TCP connection-health exporter. "
        '<a href="/metrics">Metrics</a> · <a href="/-/healthy">Health</a> · '
        '<a href="/-/ready">Readiness</a></p>'
        f"<h2>Configuration</h2><table>{rows}</table>"
        f"<h2>Poll</h2>{poll}{findings}</body></html>\n"
    )


def _findings_html(state: ExportState) -> str:
    e = html.escape
    if not state.findings:
        return "<h2>Findings</h2><p>No active findings: TCP looks healthy.</p>"
    rows = "".join(
        f'<tr><td class="{e(f.severity)}">{e(f.severity)}</td>'
        f"<td>{e(f.rule_id)} {e(f.slug)}</td><td>{e(f.netns)}</td><td>{e(f.subject)}</td>"
        f"<td>{e(f.title)}<details><summary>fix</summary><pre>{e(f.remediation)}</pre>"
        f"<p>{e(f.doc)}</p></details></td></tr>"
        for f in state.findings
    )
    return (
        f"<h2>Findings ({len(state.findings)})</h2><table><tr><th>Severity</th><th>Rule</th>"
        f"<th>Namespace</th><th>Subject</th><th>What</th></tr>{rows}</table>"
    )
