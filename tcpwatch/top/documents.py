"""The two documents `tcpwatch top` shows, checked field by field before the screen sees them.

A daemon read with ``--from`` may answer anything; the screen code indexes what it is given. So
each document is rebuilt here from the fields the screen reads, each of the type it expects
(tcpwatch/jsonshape.py), and the first field that is not is one line naming it. The status and
the counts by severity are computed from the findings, never read from the document. Strings
stay as they came: the screen escapes every line for the terminal (top/screen.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tcpwatch.jsonshape import Shape
from tcpwatch.render.json import findings_from_document
from tcpwatch.render.status import SEVERITIES, status_of
from tcpwatch.top.screen import STATE_COLUMNS

_ROWS = ("total", "ipv4", "ipv6")


def checked_findings(document: Any) -> dict[str, Any]:
    """The findings document as the screen reads it; ShapeError when it is not one."""
    findings = findings_from_document(document)
    status, _ = status_of(findings)
    counts = Counter(finding.severity for finding in findings)
    return {
        "status": status,
        "summary": {severity: counts[severity] for severity in SEVERITIES},
        "findings": [
            {
                "netns": f.netns,
                "severity": f.severity,
                "id": f.rule_id,
                "slug": f.slug,
                "title": f.title,
                "remediation": f.remediation,
            }
            for f in findings
        ],
    }


def checked_snapshot(document: Any) -> dict[str, Any]:
    """The snapshot document as the screen reads it; ShapeError when it is not one."""
    root = Shape(document)
    return {
        "last_poll": root.field("last_poll").optional_number(),
        "netns_names": root.field("netns_names").strings(),
        "namespaces": [_namespace(item) for item in root.field("namespaces").items()],
    }


def _namespace(ns: Shape) -> dict[str, Any]:
    states = ns.field("states")
    rates = ns.field("rates", required=False)
    return {
        "netns": ns.field("netns").string(),
        "sources": [
            {
                "name": s.field("name").string(),
                "ok": s.field("ok").boolean(),
                "error": s.field("error").optional_string(),
            }
            for s in ns.field("sources").items()
        ],
        "states": None
        if states.is_null()
        else {
            row: {state: states.field(row).field(state).integer() for state, _ in STATE_COLUMNS}
            for row in _ROWS
        },
        "rates": {} if rates.is_null() else {k: v.number() for k, v in rates.members()},
        "listeners": _page(ns.field("listeners"), _listener),
        "close_wait_holders": _holders(ns.field("close_wait_holders")),
        "destinations": _destinations(ns.field("destinations")),
        "slow_peers": _slow_peers(ns.field("slow_peers", required=False)),
    }


def _page(page: Shape, item: Any) -> dict[str, Any] | None:
    if page.is_null():
        return None
    return {
        "total": page.field("total").integer(),
        "items": [item(entry) for entry in page.field("items").items()],
    }


def _owner(item: Shape) -> dict[str, Any]:
    process = item.field("process").optional_string()
    pid = item.field("pid").optional_integer()
    return {"process": process, "pid": pid} if process is not None else {"process": None}


def _listener(item: Shape) -> dict[str, Any]:
    return {
        "endpoint": item.field("endpoint").string(),
        "socket": item.field("socket").integer(),
        "queue_length": item.field("queue_length").integer(),
        "queue_max": item.field("queue_max").integer(),
        "fill_ratio": item.field("fill_ratio").number(),
        "syn_recv": item.field("syn_recv").integer(),
        **_owner(item),
    }


def _holders(holders: Shape) -> list[dict[str, Any]] | None:
    if holders.is_null():
        return None
    return [{"sockets": h.field("sockets").integer(), **_owner(h)} for h in holders.items()]


def _destination(item: Shape) -> dict[str, Any]:
    return {
        "source": item.field("source").string(),
        "destination": item.field("destination").string(),
        "sockets": item.field("sockets").integer(),
        "time_wait": item.field("time_wait").integer(),
        "fill_ratio": item.field("fill_ratio").optional_number(),
    }


def _destinations(page: Shape) -> dict[str, Any] | None:
    checked = _page(page, _destination)
    if checked is not None:
        checked["port_range_size"] = page.field("port_range_size").optional_integer()
    return checked


def _slow_peer(item: Shape) -> dict[str, Any]:
    return {
        "direction": item.field("direction").choice(("inbound", "outbound")),
        "peer": item.field("peer").string(),
        "waiting_on": item.field("waiting_on").optional_string(),
        "connections": item.field("connections").integer(),
        "rwnd_limited_share": item.field("rwnd_limited_share").optional_number(),
        "sndbuf_limited_share": item.field("sndbuf_limited_share").optional_number(),
        "zero_window": item.field("zero_window").integer(),
        "send_queue_bytes": item.field("send_queue_bytes").integer(),
        "receive_queue_bytes": item.field("receive_queue_bytes").integer(),
        **_owner(item),
    }


def _slow_peers(peers: Shape) -> list[dict[str, Any]] | None:
    """None from a daemon that predates the field (its screen then has no such block)."""
    if peers.is_null():
        return None
    return [_slow_peer(item) for item in peers.items()]
