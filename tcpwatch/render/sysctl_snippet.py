"""`tcpwatch check --emit-sysctl`: one /etc/sysctl.d file for every sysctl fix the findings give.

Each setting comes with the reason for it, as a comment line above it: the rule, the finding's
title and its namespace. A sysctl two findings want set differently is written once, with the
value of the most severe finding (findings come in report order), and the other proposals as
comments, so the file never sets one name twice. Fixes for namespaces other than the host's are
left out (/etc/sysctl.d does not apply there) and counted at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

from tcpwatch.render.printable import printable_finding
from tcpwatch.rules import Finding, sort_key
from tcpwatch.rules.fixes import HOST_NETNS, persisted_settings

SNIPPET_PATH = "/etc/sysctl.d/90-tcpwatch.conf"


def render_sysctl_snippet(findings: Sequence[Finding]) -> str:
    # Titles name processes and namespaces: escaped, a newline in one cannot end its comment
    # line and add a setting to the file.
    ordered = sorted(map(printable_finding, findings), key=sort_key)
    values: dict[str, str] = {}
    reasons: dict[str, list[str]] = {}
    elsewhere = 0
    for finding in ordered:
        settings = persisted_settings(finding.remediation)
        if not settings and finding.netns != HOST_NETNS and "sysctl -w" in finding.remediation:
            elsewhere += 1
        for name, value in settings:
            why = f"{finding.rule_id} {finding.slug} ({finding.severity}): {finding.title}"
            if finding.netns != HOST_NETNS:
                why += f" [netns {finding.netns}]"
            if name not in values:
                values[name] = value
                reasons[name] = [f"# {why}"]
            elif values[name] == value:
                reasons[name].append(f"# {why}")
            else:
                reasons[name].append(f"# {why} proposes {name} = {value}, not written")
    lines = [
        f"# {SNIPPET_PATH}: written by `tcpwatch check --emit-sysctl`",
        "# Review, save as that file, then apply it with: sysctl --system (it can replace the",
        "# one-setting 90-tcpwatch-*.conf files the fixes of `tcpwatch check` write)",
    ]
    if not values:
        lines.append("# No finding proposes a sysctl setting for this host.")
    for name, value in values.items():
        lines += ["", *reasons[name], f"{name} = {value}"]
    if elsewhere:
        lines += [
            "",
            f"# Left out: {elsewhere} finding(s) in other network namespaces, where "
            "/etc/sysctl.d does not apply; set those where the namespace is created "
            "(see `tcpwatch check`).",
        ]
    return "\n".join(lines) + "\n"
