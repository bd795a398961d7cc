"""The live page at / of `tcpwatch serve`: the TCP state machine with the namespace's counts,
listeners by accept-queue fill, CLOSE_WAIT holders, destinations, who is slow (the peers'
live connections by time waiting) and findings with their fixes.

The HTML carries the first answer of the JSON API (docs/api.md) inline, and page.js (package
data, inlined: no external script, font or CDN) renders it and then polls the API every poll
interval. Strings from the host reach the page only as JSON (with ``<``, ``>`` and ``&``
escaped) and are inserted as text, never as markup; the server-rendered parts are escaped.
"""

from __future__ import annotations

import html
import json
import time
from importlib import resources
from typing import Any

from tcpwatch import __version__
from tcpwatch.config import Config
from tcpwatch.render import api
from tcpwatch.render.states import STATE_INFO
from tcpwatch.state import ExportState

# The classic diagram: (state, centre x, centre y) on a 960 x 640 canvas; opening at the top,
# the active closer's sequence on the left, the passive closer's on the right.
BOX_W, BOX_H = 150, 58
LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("close", 480, 45),
    ("listen", 480, 145),
    ("syn_recv", 200, 245),
    ("syn_sent", 760, 245),
    ("established", 480, 345),
    ("fin_wait1", 200, 445),
    ("close_wait", 760, 445),
    ("closing", 480, 500),
    ("fin_wait2", 200, 565),
    ("last_ack", 760, 565),
    ("time_wait", 480, 600),
)
# (from, to, label): the transitions of RFC 9293's diagram, without the error and reset paths.
EDGES: tuple[tuple[str, str, str], ...] = (
    ("close", "listen", "passive open"),
    ("close", "syn_sent", "connect / SYN"),
    ("listen", "syn_recv", "rcv SYN / SYN+ACK"),
    ("syn_sent", "syn_recv", "rcv SYN"),
    ("syn_recv", "established", "rcv ACK"),
    ("syn_sent", "established", "rcv SYN+ACK / ACK"),
    ("established", "fin_wait1", "close / FIN"),
    ("established", "close_wait", "rcv FIN / ACK"),
    ("fin_wait1", "fin_wait2", "rcv ACK"),
    ("fin_wait1", "closing", "rcv FIN / ACK"),
    ("fin_wait2", "time_wait", "rcv FIN / ACK"),
    ("closing", "time_wait", "rcv ACK"),
    ("close_wait", "last_ack", "close / FIN"),
)
_RETURNS = (  # routed around the edge of the canvas back to CLOSE
    ("last_ack", "M835,565 H930 V45 H555", "rcv ACK"),
    ("time_wait", "M405,600 H30 V45 H405", "2MSL timeout (60 s)"),
)


def _asset(name: str) -> str:
    return resources.files("tcpwatch.render").joinpath(name).read_text(encoding="utf-8")


def _edge(start: tuple[int, int], end: tuple[int, int]) -> tuple[float, float, float, float]:
    """A line from box edge to box edge between two centres."""
    (x1, y1), (x2, y2) = start, end
    dx, dy = x2 - x1, y2 - y1

    def cut(x: float, y: float, sx: float, sy: float) -> tuple[float, float]:
        scale = min(
            (BOX_W / 2) / abs(dx) if dx else float("inf"),
            (BOX_H / 2) / abs(dy) if dy else float("inf"),
        )
        return x + sx * dx * scale, y + sy * dy * scale

    ax, ay = cut(x1, y1, 1, 1)
    bx, by = cut(x2, y2, -1, -1)
    return ax, ay, bx, by


def state_diagram() -> str:
    """The SVG of the state machine; page.js fills each state's counts and colour."""
    centres = {state: (x, y) for state, x, y in LAYOUT}
    parts = [
        '<svg id="diagram" viewBox="0 0 960 640" role="img" '
        'aria-label="TCP state machine with live socket counts">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker>'
        "</defs>"
    ]
    for start, end, label in EDGES:
        ax, ay, bx, by = _edge(centres[start], centres[end])
        parts.append(
            f'<g class="edge"><line x1="{ax:.0f}" y1="{ay:.0f}" x2="{bx:.0f}" y2="{by:.0f}" '
            f'marker-end="url(#arrow)"/><text x="{(ax + bx) / 2:.0f}" y="{(ay + by) / 2 - 4:.0f}">'
            f"{html.escape(label)}</text></g>"
        )
    for _, path, _label in _RETURNS:
        parts.append(f'<g class="edge"><path d="{path}" marker-end="url(#arrow)"/></g>')
    parts.append('<text class="edge-label" x="935" y="320" transform="rotate(90 935 320)">')
    parts.append(f"{_RETURNS[0][2]}</text>")
    parts.append('<text class="edge-label" x="25" y="320" transform="rotate(-90 25 320)">')
    parts.append(f"{_RETURNS[1][2]}</text>")
    for state, x, y in LAYOUT:
        label = STATE_INFO[state].label
        left, top = x - BOX_W // 2, y - BOX_H // 2
        parts.append(
            f'<g class="state" id="state-{state}" data-state="{state}" tabindex="0" '
            f'role="button" aria-label="{label}">'
            f'<rect x="{left}" y="{top}" width="{BOX_W}" height="{BOX_H}" rx="8"/>'
            f'<text class="name" x="{x}" y="{top + 16}">{label}</text>'
            f'<text class="count" data-family="total" x="{x}" y="{top + 37}">-</text>'
            f'<text class="families" x="{x}" y="{top + 52}">v4 <tspan data-family="ipv4">-'
            f'</tspan> · v6 <tspan data-family="ipv6">-</tspan></text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survives to close the element."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _settings(config: Config, listening_on: str, web_summary: str) -> list[tuple[str, str]]:
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
    return [
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


def landing_page(
    state: ExportState | None, config: Config, listening_on: str, web_summary: str, now: float
) -> str:
    """The page at /. ``web_summary`` says what the web config turns on."""
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>"
        for k, v in _settings(config, listening_on, web_summary)
    )
    first = state.snapshots[0].netns if state is not None and state.snapshots else None
    data = {
        "interval": config.interval,
        "netns": first,
        "states": {
            name: {"label": info.label, "meaning": info.meaning, "rules": list(info.rules)}
            for name, info in STATE_INFO.items()
        },
        "snapshot": (
            api.snapshot_document(state, api.SnapshotQuery(netns=first))
            if state is not None
            else None
        ),
        "findings": (
            api.findings_document(state, first, api.DEFAULT_FINDINGS_LIMIT, config.docs_url)
            if state is not None
            else None
        ),
    }
    polled = (
        "latest poll "
        + time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(state.last_poll))
        + f" ({max(now - state.last_poll, 0):.0f} s ago)"
        if state is not None
        else "The first poll has not finished yet."
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tcpwatch</title><style>{_asset('page.css')}</style></head><body>"
        f'<header><h1>tcpwatch <span class="version">{e(__version__)}</span></h1>'
        '<label id="netns-choice">namespace <select id="netns"></select></label>'
        f'<span id="status" class="status">{e(polled)}</span>'
        '<nav><a href="/metrics">metrics</a> · <a href="/api/v1/snapshot">API</a> · '
        '<a href="/rules/">rules</a> · <a href="/-/healthy">health</a></nav></header>'
        '<p id="summary" class="summary"></p><ul id="sources" class="note"></ul>'
        f'<main><section id="machine">{state_diagram()}</section>'
        '<aside id="detail"><p class="hint">Click a state for what it means, its history and '
        "its findings.</p></aside></main>"
        '<section><h2>Listeners by accept-queue fill</h2><table id="listeners"><thead><tr>'
        "<th>listener</th><th>owner</th><th>accept queue</th><th></th><th>SYN queue</th></tr>"
        '</thead><tbody></tbody></table><p id="listeners-more" class="note"></p></section>'
        '<section class="pair"><div><h2>CLOSE_WAIT holders</h2><table id="holders"><thead><tr>'
        "<th>process</th><th>CLOSE_WAIT</th></tr></thead><tbody></tbody></table></div>"
        '<div><h2>Destinations by ephemeral ports</h2><table id="destinations"><thead><tr>'
        "<th>source → destination</th><th>sockets</th><th>TIME_WAIT</th><th>range used</th></tr>"
        "</thead><tbody></tbody></table></div></section>"
        '<section><h2>Who is slow: peers by time waiting</h2><table id="slow-peers"><thead><tr>'
        "<th>peer</th><th>process</th><th>waiting on</th><th>connections</th>"
        "<th>receiver-limited</th><th>send-buffer-limited</th><th>zero window now</th>"
        "<th>Send-Q</th><th>Recv-Q</th><th>retransmitted</th></tr></thead><tbody></tbody>"
        '</table><p id="slow-peers-none" class="note"></p></section>'
        '<section><h2>Findings</h2><div id="findings"></div></section>'
        f"<details><summary>Configuration</summary><table>{rows}</table></details>"
        f'<script id="tw-data" type="application/json">{_script_json(data)}</script>'
        f"<script>{_asset('page.js')}</script>"
        "<noscript><p>This page needs JavaScript to show the live counts; the same data is at "
        '<a href="/api/v1/snapshot">/api/v1/snapshot</a>.</p></noscript></body></html>\n'
    )
