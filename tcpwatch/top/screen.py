"""One screen of `tcpwatch top`, laid out from /api/v1/snapshot and /api/v1/findings documents.

Pure: documents and a size in, styled lines out, so the layout is tested without a terminal and
the batch mode prints the very same lines. Every line is escaped for the terminal
(tcpwatch/escape.py) before it is cut to the width: a name from the host or the daemon with an
escape sequence, a newline or a NUL (which curses refuses) is shown as ``\x1b``, ``\n``,
``\x00``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tcpwatch.escape import terminal

# Short column labels, in the order an on-call engineer reads them: opening, open, closing.
STATE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("listen", "LISTEN"),
    ("syn_sent", "SYN-SENT"),
    ("syn_recv", "SYN-RECV"),
    ("established", "ESTAB"),
    ("fin_wait1", "FIN-WAIT1"),
    ("fin_wait2", "FIN-WAIT2"),
    ("closing", "CLOSING"),
    ("time_wait", "TIME-WAIT"),
    ("close_wait", "CLOSE-WAIT"),
    ("last_ack", "LAST-ACK"),
    ("close", "CLOSE"),
)
# Counters whose rates the header shows (nstat names, shown without the Tcp/TcpExt prefix).
RATE_COUNTERS: tuple[str, ...] = (
    "TcpActiveOpens",
    "TcpPassiveOpens",
    "TcpAttemptFails",
    "TcpEstabResets",
    "TcpRetransSegs",
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtTCPTimeouts",
)
SORT_LABELS: Mapping[str, str] = {
    "fill": "accept-queue fill",
    "syn_recv": "SYN queue",
    "port": "port",
}
BAR = 10


@dataclass(frozen=True, slots=True)
class Line:
    text: str
    style: str = ""  # "", "title", "heading", "critical", "warning", "info", "dim", "ok"


@dataclass(frozen=True, slots=True)
class View:
    """What the person chose: the namespace, the listener sort, paused or not."""

    netns: str | None = None
    sort: str = "fill"
    paused: bool = False
    source: str = ""  # where the numbers come from, for the title
    note: str = ""  # why they come from there, when that needs saying: a line of its own


def _cut(text: str, width: int) -> str:
    text = terminal(text)
    return text if len(text) <= width else text[: max(width - 1, 0)] + "~"


def _bar(ratio: float) -> str:
    filled = max(0, min(BAR, round(ratio * BAR)))
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _owner(item: Mapping[str, Any]) -> str:
    return "-" if item.get("process") is None else f"{item['process']}[{item['pid']}]"


def _states_block(states: Mapping[str, Mapping[str, int]], width: int) -> list[Line]:
    """The states table, split into as many column blocks as the width needs."""
    rows = ("total", "ipv4", "ipv6")
    columns = []
    for state, label in STATE_COLUMNS:
        cells = [str(states[row][state]) for row in rows]
        columns.append((label, cells, max(len(label), *(len(c) for c in cells)) + 2))
    lines: list[Line] = []
    start = 0
    while start < len(columns):
        used, end = 7, start
        while end < len(columns) and (end == start or used + columns[end][2] <= width):
            used += columns[end][2]
            end += 1
        block = columns[start:end]
        lines.append(Line("STATE  " + "".join(f"{lbl:>{w}}" for lbl, _, w in block), "heading"))
        for index, row in enumerate(rows):
            text = "".join(f"{values[index]:>{w}}" for _, values, w in block)
            lines.append(Line(f"{row:<7}" + text, "" if index == 0 else "dim"))
        start = end
    return lines


def _rates(rates: Mapping[str, float]) -> str:
    if not rates:
        return "rates/s  (after the second poll)"
    parts = []
    for name in RATE_COUNTERS:
        if name in rates:
            short = name.removeprefix("TcpExt").removeprefix("Tcp")
            parts.append(f"{short} {rates[name]:.1f}")
    return "rates/s  " + "  ".join(parts)


def _listeners(ns: Mapping[str, Any], sort: str) -> list[Line]:
    page = ns.get("listeners")
    if page is None:
        return [Line("LISTENERS: not known (the socket source failed)", "warning")]
    lines = [
        Line(f"LISTENERS by {SORT_LABELS[sort]}, {len(page['items'])} of {page['total']}", "title"),
        Line(f"  {'LISTENER':<28}{'OWNER':<24}{'QUEUE':>11}  {'FILL':<18}{'SYN-Q':>6}", "heading"),
    ]
    for item in page["items"]:
        ratio = item["fill_ratio"]
        style = "critical" if ratio >= 1 else "warning" if ratio >= 0.8 else ""
        queue = f"{item['queue_length']}/{item['queue_max']}"
        endpoint = item["endpoint"] + (f" #{item['socket']}" if item["socket"] else "")
        lines.append(
            Line(
                f"  {_cut(endpoint, 27):<28}{_cut(_owner(item), 23):<24}{queue:>11}  "
                f"{_bar(ratio)} {ratio * 100:>4.0f}%  {item['syn_recv']:>6}",
                style,
            )
        )
    return lines


def _holders(ns: Mapping[str, Any]) -> list[Line]:
    holders = ns.get("close_wait_holders")
    if holders is None:
        return [Line("CLOSE_WAIT HOLDERS: not collected (collect.attribute_states)", "dim")]
    lines = [
        Line("CLOSE_WAIT HOLDERS", "title"),
        Line(f"  {'PROCESS':<40}{'CLOSE-WAIT':>10}", "heading"),
    ]
    lines += [Line(f"  {_cut(_owner(h), 39):<40}{h['sockets']:>10}") for h in holders]
    if not holders:
        lines.append(Line("  none", "dim"))
    return lines


def _destinations(ns: Mapping[str, Any]) -> list[Line]:
    page = ns.get("destinations")
    if page is None:
        return []
    size = page.get("port_range_size")
    lines = [
        Line(f"DESTINATIONS by ephemeral ports ({size or '?'} in the range)", "title"),
        Line(
            f"  {'SOURCE -> DESTINATION':<48}{'SOCKETS':>9}{'TIME-WAIT':>11}  RANGE USED", "heading"
        ),
    ]
    for item in page["items"]:
        ratio = item["fill_ratio"]
        used = f"{_bar(ratio)} {ratio * 100:.0f}%" if ratio is not None else ""
        pair = f"{item['source']} -> {item['destination']}"
        lines.append(
            Line(
                f"  {_cut(pair, 47):<48}{item['sockets']:>9}{item['time_wait']:>11}  {used}",
                "critical" if ratio is not None and ratio > 0.8 else "",
            )
        )
    if not page["items"]:
        lines.append(Line("  none", "dim"))
    return lines


def _size(value: int) -> str:
    if value < 1024:
        return f"{value}B"
    if value < 1 << 20:
        return f"{value / 1024:.1f}K"
    return f"{value / (1 << 20):.1f}M"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _slow_peers(ns: Mapping[str, Any]) -> list[Line]:
    """Who is slow: each peer's live connections, those waiting on something first."""
    peers = ns.get("slow_peers")
    if peers is None:
        return []
    lines = [
        Line("WHO IS SLOW: peers by time waiting (live connections)", "title"),
        Line(
            f"  {'PEER':<30}{'OWNER':<20}{'WAITING ON':<13}{'CONNS':>6}{'RCVR':>6}{'SNDBUF':>7}"
            f"{'ZEROWIN':>8}{'SEND-Q':>9}{'RECV-Q':>9}",
            "heading",
        ),
    ]
    for item in peers:
        prefix = "clients of " if item["direction"] == "inbound" else "to "
        waiting = item["waiting_on"] or "-"
        lines.append(
            Line(
                f"  {_cut(prefix + item['peer'], 29):<30}{_cut(_owner(item), 19):<20}"
                f"{_cut(waiting, 12):<13}{item['connections']:>6}"
                f"{_percent(item['rwnd_limited_share']):>6}"
                f"{_percent(item['sndbuf_limited_share']):>7}{item['zero_window']:>8}"
                f"{_size(item['send_queue_bytes']):>9}{_size(item['receive_queue_bytes']):>9}",
                "warning" if item["waiting_on"] else "",
            )
        )
    if not peers:
        lines.append(Line("  none scanned yet", "dim"))
    return lines


def _findings(findings: Mapping[str, Any], netns: str) -> list[Line]:
    items = [f for f in findings.get("findings", []) if f["netns"] == netns]
    lines = [Line(f"FINDINGS ({len(items)})", "title")]
    for finding in items:
        lines.append(
            Line(
                f"  {finding['severity'].upper():<9}{finding['id']} {finding['slug']}: "
                f"{finding['title']}",
                finding["severity"],
            )
        )
        fix = next((ln for ln in finding["remediation"].splitlines() if ln.strip()), "")
        if fix and finding["severity"] != "info":
            lines.append(Line(f"           fix: {fix.strip()}", "dim"))
    if not items:
        lines.append(Line("  none: TCP looks healthy here", "ok"))
    return lines


def choose(snapshot: Mapping[str, Any], wanted: str | None) -> Mapping[str, Any] | None:
    """The namespace document shown: the one wanted, else the first."""
    namespaces: Sequence[Mapping[str, Any]] = snapshot.get("namespaces", [])
    for ns in namespaces:
        if ns["netns"] == wanted:
            return ns
    return namespaces[0] if namespaces else None


def layout(
    snapshot: Mapping[str, Any], findings: Mapping[str, Any], view: View, width: int
) -> list[Line]:
    """Every line of the screen, in order, each at most ``width`` characters."""
    names: Sequence[str] = snapshot.get("netns_names", [])
    ns = choose(snapshot, view.netns)
    try:
        polled = time.strftime("%H:%M:%S", time.localtime(snapshot.get("last_poll") or 0))
    except (OverflowError, OSError, ValueError):  # a daemon's time far outside the calendar
        polled = "?"
    where = "no namespace" if ns is None else f"netns {ns['netns']}"
    position = (
        f" ({names.index(ns['netns']) + 1}/{len(names)})" if ns and ns["netns"] in names else ""
    )
    title = f"tcpwatch top - {where}{position} - poll {polled} - {view.source}" + (
        " - PAUSED" if view.paused else ""
    )
    status = findings.get("status", "?")
    summary = findings.get("summary", {})
    counts = ", ".join(
        f"{summary[s]} {s}" for s in ("critical", "warning", "info") if summary.get(s)
    )
    lines = [
        Line(title, "title"),
        Line(
            f"status   {status}" + (f" - {counts}" if counts else " - no findings"),
            {"CRITICAL": "critical", "WARNING": "warning"}.get(status, "ok"),
        ),
    ]
    if view.note:
        lines.append(Line(f"source   {view.note}", "dim"))
    if ns is None:
        return [Line(_cut(line.text, width), line.style) for line in lines]
    failed = [s for s in ns.get("sources", []) if not s["ok"]]
    for source in failed:
        lines.append(Line(f"source   {source['name']} failed: {source['error']}", "warning"))
    if ns.get("states") is None:
        lines.append(Line("STATES: not known (the socket source failed)", "warning"))
    else:
        lines += _states_block(ns["states"], width)
    lines.append(Line(_rates(ns.get("rates", {}))))
    lines.append(Line(""))
    lines += _listeners(ns, view.sort)
    lines.append(Line(""))
    lines += _holders(ns)
    lines.append(Line(""))
    lines += _destinations(ns)
    lines.append(Line(""))
    slow = _slow_peers(ns)
    if slow:
        lines += [*slow, Line("")]
    lines += _findings(findings, ns["netns"])
    return [Line(_cut(line.text, width), line.style) for line in lines]


KEYS_HELP = "q quit  n namespace  s sort  p pause  r refresh now"


def fit(lines: Sequence[Line], width: int, height: int) -> list[Line]:
    """The lines that fit a terminal: the top of the screen, and the keys on the last row."""
    lines = [Line(_cut(line.text, width), line.style) for line in lines]
    if height < 2:
        return lines[:height]
    body = lines[: height - 1]
    return [*body, *[Line("")] * (height - 1 - len(body)), Line(_cut(KEYS_HELP, width), "dim")]
