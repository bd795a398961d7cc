"""take_snapshot(): run every source for one namespace, time each, record failures, never raise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from tcpwatch.config import CollectSettings
from tcpwatch.model import Attribution, Snapshot, SocketTable, SourceStatus
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import netns as netns_source
from tcpwatch.sources import processes, procnet, sockdiag, sysctl

SOURCES = ("sysctl", "sockstat", "counters", "sockdiag", "processes")

log = logging.getLogger(__name__)
T = TypeVar("T")


def _timed(name: str, read: Callable[[], T], statuses: list[SourceStatus]) -> T | None:
    started = time.perf_counter()
    try:
        value = read()
    except Exception as error:  # a source must never take the poll down with it
        log.debug("source %s failed", name, exc_info=True)
        statuses.append(SourceStatus(name, False, time.perf_counter() - started, _describe(error)))
        return None
    statuses.append(SourceStatus(name, True, time.perf_counter() - started))
    return value


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0]


def wanted_inodes(table: SocketTable) -> frozenset[int]:
    """Inodes worth attributing: listeners and the chosen states (0 = no socket file, skip)."""
    inodes = {listener.inode for listener in table.listeners}
    for state_inodes in table.inodes_by_state.values():
        inodes.update(state_inodes)
    inodes.discard(0)
    return frozenset(inodes)


def resolve_netns_name(paths: ProcPaths) -> str:
    try:
        return netns_source.netns_name(paths, netns_source.current_netns_inode(paths))
    except OSError:
        return "unknown"


def take_snapshot(
    settings: CollectSettings,
    paths: ProcPaths | None = None,
    netns: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Snapshot:
    """One poll of the namespace that ``paths`` (and this process' netlink socket) sees."""
    paths = paths or ProcPaths()
    statuses: list[SourceStatus] = []
    taken_at = clock()
    sysctls = _timed("sysctl", lambda: sysctl.read_sysctls(paths), statuses)
    # sockstat is read right before the dump: inbound ESTABLISHED is derived from its inuse.
    sockstat = _timed("sockstat", lambda: procnet.read_sockstat(paths), statuses)
    counters = _timed("counters", lambda: procnet.read_counters(paths), statuses)
    inuse = None
    if sockstat is not None and settings.established == "derived":
        inuse = {"ipv4": sockstat.inuse_ipv4, "ipv6": sockstat.inuse_ipv6}
    port_range = sysctls.port_range if sysctls is not None else None
    sockets = _timed(
        "sockdiag",
        lambda: sockdiag.collect(
            port_range,
            inuse,
            settings.attribute_states if settings.process_attribution else (),
            dump_established=settings.established == "dumped",
        ),
        statuses,
    )
    attribution: Attribution | None = None
    if settings.process_attribution and sockets is not None:
        wanted = wanted_inodes(sockets)
        attribution = _timed(
            "processes",
            lambda: processes.scan_owners(paths, wanted, settings.process_scan_timeout),
            statuses,
        )
    return Snapshot(
        netns=netns if netns is not None else resolve_netns_name(paths),
        taken_at=taken_at,
        sockets=sockets,
        counters=counters,
        sockstat=sockstat,
        sysctls=sysctls,
        attribution=attribution,
        sources=tuple(statuses),
    )
