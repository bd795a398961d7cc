"""The JSON API of `tcpwatch serve` (/api/v1/snapshot, /api/v1/findings, /api/v1/owners),
documented in docs/api.md and read by the live page, `tcpwatch top`, `tcpwatch check --from` and
`tcpwatch check` itself (the owners, each confirmed before use).

Every list that grows with the host is cut: listeners and destinations are paginated
(``limit``/``offset``), CLOSE_WAIT holders and history are capped, so a host with 10,000 listeners
still answers in bounded size and time. JSON escapes every string; the page inserts them as text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tcpwatch import __version__
from tcpwatch.endpoints import endpoint, ports_available
from tcpwatch.model import FAMILIES, STATES, Listener, Snapshot
from tcpwatch.render.json import report_document
from tcpwatch.stalls import live_peers, slowest, waiting_on
from tcpwatch.state import ExportState, Trend

API_VERSION = 1
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_NAMESPACES = 100  # namespaces detailed per answer; ``netns_names`` lists them all
DEFAULT_FINDINGS_LIMIT = 1000
MAX_FINDINGS_LIMIT = 10_000
DEFAULT_OWNERS_LIMIT = 1000
MAX_OWNERS_LIMIT = 10_000
LISTENER_SORTS = ("fill", "syn_recv", "port")
RULE_PAGES = "/rules/"  # where serve shows each rule's page (render/rulepage.py)


class QueryError(ValueError):
    """A query parameter out of range: a 400 answer, with this message."""


@dataclass(frozen=True, slots=True)
class SnapshotQuery:
    """What /api/v1/snapshot was asked for."""

    netns: str | None = None  # None: every namespace (up to MAX_NAMESPACES)
    limit: int = DEFAULT_LIMIT  # listeners and destinations per namespace
    offset: int = 0  # first listener / destination returned
    sort: str = "fill"  # listeners: fill (accept queue), syn_recv or port


def _integer(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise QueryError(f"{name}: expected an integer from {low} to {high}, got {text[:40]!r}")
    return int(text)


def snapshot_query(query: Mapping[str, str]) -> SnapshotQuery:
    """Parse the query string of /api/v1/snapshot (QueryError when out of range)."""
    sort = query.get("sort", "fill")
    if sort not in LISTENER_SORTS:
        raise QueryError(f"sort: expected one of {', '.join(LISTENER_SORTS)}, got {sort[:40]!r}")
    return SnapshotQuery(
        netns=query.get("netns") or None,
        limit=_integer(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        offset=_integer(query, "offset", 0, 0, 10**9),
        sort=sort,
    )


def findings_limit(query: Mapping[str, str]) -> int:
    return _integer(query, "limit", DEFAULT_FINDINGS_LIMIT, 1, MAX_FINDINGS_LIMIT)


def owners_query(query: Mapping[str, str]) -> tuple[int, int]:
    """``limit`` and ``offset`` of /api/v1/owners (QueryError when out of range)."""
    limit = _integer(query, "limit", DEFAULT_OWNERS_LIMIT, 1, MAX_OWNERS_LIMIT)
    return limit, _integer(query, "offset", 0, 0, 10**9)


def fill_ratio(listener: Listener) -> float:
    """Accept-queue fill: length / max (above 1.0 when full: the kernel admits max + 1)."""
    if listener.queue_max > 0:
        return listener.queue_length / listener.queue_max
    return 1.0 if listener.queue_length else 0.0


def _listener_key(sort: str) -> Any:
    if sort == "syn_recv":
        return lambda item: (-item.syn_recv, -fill_ratio(item), item.port, item.address)
    if sort == "port":
        return lambda item: (item.port, item.address, item.socket_index)
    return lambda item: (-fill_ratio(item), -item.queue_length, -item.syn_recv, item.port)


def _page(total: int, query: SnapshotQuery, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"total": total, "offset": query.offset, "limit": query.limit, "items": items}


def _listeners(snapshot: Snapshot, query: SnapshotQuery) -> dict[str, Any] | None:
    if snapshot.sockets is None:
        return None
    ordered = sorted(snapshot.sockets.listeners, key=_listener_key(query.sort))
    items = []
    for listener in ordered[query.offset : query.offset + query.limit]:
        owner = snapshot.attribution.owner(listener.inode) if snapshot.attribution else None
        items.append(
            {
                "family": listener.family,
                "address": listener.address,
                "port": listener.port,
                "endpoint": endpoint(listener.address, listener.port),
                "socket": listener.socket_index,
                "queue_length": listener.queue_length,
                "queue_max": listener.queue_max,
                "fill_ratio": round(fill_ratio(listener), 4),
                "syn_recv": listener.syn_recv,
                "process": owner.name if owner else None,
                "pid": owner.pid if owner else None,
            }
        )
    return _page(len(ordered), query, items)


def _destinations(snapshot: Snapshot, query: SnapshotQuery) -> dict[str, Any] | None:
    if snapshot.sockets is None:
        return None
    uses = snapshot.sockets.ephemeral_use
    size = None
    if snapshot.sysctls is not None and snapshot.sysctls.port_range is not None:
        low, high = snapshot.sysctls.port_range
        size = ports_available(low, high, snapshot.sysctls.reserved_ports)
    items = [
        {
            "family": use.family,
            "source": use.source,
            "destination": endpoint(use.address, use.port),
            "sockets": use.sockets,
            "time_wait": use.time_wait,
            "fill_ratio": round(use.sockets / size, 4) if size else None,
        }
        for use in uses[query.offset : query.offset + query.limit]
    ]
    page = _page(len(uses), query, items)
    page["port_range_size"] = size
    page["scanned_at"] = snapshot.sockets.destinations_at or None
    return page


def _close_wait_holders(snapshot: Snapshot, top: int) -> list[dict[str, Any]] | None:
    """Processes holding the most CLOSE_WAIT sockets (None: CLOSE_WAIT owners not collected)."""
    if snapshot.sockets is None or snapshot.attribution is None:
        return None
    inodes = snapshot.sockets.inodes_by_state.get("close_wait")
    if inodes is None:
        return None
    holders: Counter[tuple[int, str]] = Counter()
    unowned = 0
    for inode in inodes:
        owner = snapshot.attribution.owner(inode)
        if owner is None:
            unowned += 1
        else:
            holders[(owner.pid, owner.name)] += 1
    ranked = sorted(holders.items(), key=lambda item: (-item[1], item[0][1], item[0][0]))
    result: list[dict[str, Any]] = [
        {"process": name, "pid": pid, "sockets": count} for (pid, name), count in ranked[:top]
    ]
    if unowned:
        result.append({"process": None, "pid": None, "sockets": unowned})
    return result


def _slow_peers(snapshot: Snapshot, top: int) -> list[dict[str, Any]]:
    """The live peers, those waiting on something first, then by time spent waiting."""
    items = []
    for peer in slowest(live_peers(snapshot.sockets, snapshot.inbound))[:top]:
        stalls = peer.stalls
        inodes = [peer.inode] if peer.inode else [c.inode for c in stalls.worst]
        owners = [o for o in map(snapshot.attribution.owner, inodes) if o is not None] if (
            snapshot.attribution is not None
        ) else []  # fmt: skip
        sent = stalls.segments_sent
        rwnd, sndbuf = (
            stalls.share(stalls.rwnd_limited_seconds),
            stalls.share(stalls.sndbuf_limited_seconds),
        )
        items.append(
            {
                "direction": peer.direction,
                "peer": peer.peer,
                "waiting_on": waiting_on(stalls) or None,
                "connections": stalls.connections,
                "busy_seconds": stalls.busy_seconds,
                "rwnd_limited_share": None if rwnd is None else round(rwnd, 4),
                "sndbuf_limited_share": None if sndbuf is None else round(sndbuf, 4),
                "zero_window": stalls.zero_window,
                "receive_full": stalls.receive_full,
                "send_queue_bytes": stalls.send_queue_bytes,
                "receive_queue_bytes": stalls.receive_queue_bytes,
                "retransmission_ratio": round(stalls.segments_retransmitted / sent, 4)
                if sent
                else None,
                "process": owners[0].name if owners else None,
                "pid": owners[0].pid if owners else None,
            }
        )
    return items


def _states(snapshot: Snapshot) -> dict[str, dict[str, int]] | None:
    if snapshot.sockets is None:
        return None
    counts = snapshot.sockets.counts
    states = {family: {s: counts.get(family, {}).get(s, 0) for s in STATES} for family in FAMILIES}
    states["total"] = {s: snapshot.sockets.total(s) for s in STATES}
    return states


def _history(trend: Trend) -> dict[str, Any]:
    return {
        "times": list(trend.times),
        "states": {s: [point[i] for point in trend.totals] for i, s in enumerate(STATES)},
    }


def _namespace(state: ExportState, snapshot: Snapshot, query: SnapshotQuery) -> dict[str, Any]:
    trend = state.trends.get(snapshot.netns, Trend())
    identity = snapshot.identity
    severities = Counter(f.severity for f in state.findings if f.netns == snapshot.netns)
    return {
        "netns": snapshot.netns,
        "taken_at": snapshot.taken_at,
        "identity": {
            "inode": identity.inode or None,
            "container": identity.container,
            "pod": identity.pod,
            "pod_namespace": identity.pod_namespace,
        },
        "states": _states(snapshot),
        "established_method": snapshot.sockets.established_method if snapshot.sockets else None,
        "listeners": _listeners(snapshot, query),
        "close_wait_holders": _close_wait_holders(snapshot, state.top_processes),
        "destinations": _destinations(snapshot, query),
        "slow_peers": _slow_peers(snapshot, state.top_destinations),
        "counters": (
            {k: v for k, v in sorted(snapshot.counters.values.items()) if k.startswith("Tcp")}
            if snapshot.counters
            else None
        ),
        "rates": {k: round(v, 3) for k, v in sorted(trend.rates.items()) if k.startswith("Tcp")},
        "history": _history(trend),
        "time_wait_buckets": (
            snapshot.sysctls.get("net.ipv4.tcp_max_tw_buckets") if snapshot.sysctls else None
        ),
        "findings": {s: severities[s] for s in ("critical", "warning", "info")},
        "sources": [
            {
                "name": s.name,
                "ok": s.ok,
                "duration_seconds": s.duration_seconds,
                "error": s.error,
                "skipped": list(s.skipped),
            }
            for s in snapshot.sources
        ],
    }


def snapshot_document(state: ExportState, query: SnapshotQuery) -> dict[str, Any]:
    """/api/v1/snapshot: every namespace (or the one asked for) as of the latest poll."""
    names = [snapshot.netns for snapshot in state.snapshots]
    chosen: Sequence[Snapshot] = [
        s for s in state.snapshots if query.netns is None or s.netns == query.netns
    ]
    return {
        "api_version": API_VERSION,
        "tcpwatch_version": __version__,
        "last_poll": state.last_poll,
        "interval_seconds": state.interval,
        "netns_names": names,
        "namespaces": [_namespace(state, s, query) for s in chosen[:MAX_NAMESPACES]],
    }


def window_of(state: ExportState) -> float:
    """Seconds the daemon's rules judged: from the start of their window (``rules.window``) to
    the latest poll; the span of the two latest polls for a state that does not say."""
    if state.window > 0:
        return round(state.window, 3)
    spans = [t.times[-1] - t.times[-2] for t in state.trends.values() if len(t.times) >= 2]
    return round(max(spans), 3) if spans else 0.0


def findings_document(
    state: ExportState, netns: str | None, limit: int, docs_url: str = ""
) -> dict[str, Any]:
    """/api/v1/findings: the `check --format json` report of the daemon's latest poll.

    ``doc_url`` is the page under the configured ``docs_url``, or, with none, the page this
    daemon serves itself (``/rules/Q01``, a path on the same host and port)."""
    snapshots = [s for s in state.snapshots if netns is None or s.netns == netns]
    findings = [f for f in state.findings if netns is None or f.netns == netns]
    document = report_document(findings, snapshots, window_of(state), limit, docs_url)
    if not docs_url:
        for item in document["findings"]:
            item["doc_url"] = f"{RULE_PAGES}{item['id']}"
    return document


def owners_document(state: ExportState, limit: int, offset: int = 0) -> dict[str, Any]:
    """/api/v1/owners: where the latest poll found each attributed socket's owner (socket inode,
    pid, descriptor, process name), listeners first, then by inode; paginated.

    What `check` asks its local daemon so it need not walk every process' descriptors: it
    confirms each location itself with one readlink and re-reads the name, so this answer is a
    hint, never evidence. Inodes are host-wide: one list serves every polled namespace."""
    locations: dict[int, tuple[int, str, str]] = {}
    listening: set[int] = set()
    for snapshot in state.snapshots:
        attribution = snapshot.attribution
        if attribution is None:
            continue
        for inode, (pid, fd) in attribution.locations.items():
            owner = attribution.owner(inode)
            if owner is not None and owner.pid == pid and fd.isdigit():
                locations[inode] = (pid, fd, owner.name)
        if snapshot.sockets is not None:
            listening.update(listener.inode for listener in snapshot.sockets.listeners)
    ordered = sorted(locations, key=lambda inode: (inode not in listening, inode))
    items = [
        {
            "inode": inode,
            "pid": locations[inode][0],
            "fd": int(locations[inode][1]),
            "process": locations[inode][2],
            "listener": inode in listening,
        }
        for inode in ordered[offset : offset + limit]
    ]
    return {
        "api_version": API_VERSION,
        "tcpwatch_version": __version__,
        "last_poll": state.last_poll,
        "total": len(ordered),
        "offset": offset,
        "limit": limit,
        "owners": items,
    }
