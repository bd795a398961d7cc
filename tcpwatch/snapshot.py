"""take_snapshot(): run every source for one namespace, time each, record failures, never raise."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TypeVar

from tcpwatch.config import CollectSettings
from tcpwatch.model import Attribution, NetnsIdentity, Snapshot, SocketTable, SourceStatus
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import netns as netns_source
from tcpwatch.sources import processes, procnet, sockdiag, sysctl

SOURCES = ("netns", "sysctl", "sockstat", "counters", "sockdiag", "processes")

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
    """Inodes worth attributing: listeners, self-connected sockets and the chosen states
    (0 = no socket file, skip)."""
    inodes = {listener.inode for listener in table.listeners}
    inodes.update(connected.inode for connected in table.self_connects)
    for state_inodes in table.inodes_by_state.values():
        inodes.update(state_inodes)
    inodes.discard(0)
    return frozenset(inodes)


def _with_destinations_of(sockets: SocketTable, earlier: SocketTable) -> SocketTable:
    """This poll's counts with an earlier poll's per-destination data (and its age)."""
    return replace(
        sockets,
        ephemeral_use=earlier.ephemeral_use,
        self_connects=(
            *sockets.self_connects,
            *(c for c in earlier.self_connects if c.state == "established"),
        ),
        destinations_at=earlier.destinations_at,
    )


def _own_netns_inode(paths: ProcPaths) -> frozenset[int]:
    try:
        return frozenset({netns_source.current_netns_inode(paths)})
    except OSError:
        return frozenset()


def take_snapshot(
    settings: CollectSettings,
    paths: ProcPaths | None = None,
    netns: str | None = None,
    clock: Callable[[], float] = time.time,
    scan_processes: bool = True,
    known_owners: Attribution | None = None,
    earlier: SocketTable | None = None,
) -> Snapshot:
    """One poll of the namespace that ``paths`` (and this process' netlink socket) sees.

    ``scan_processes=False`` still collects the inodes to attribute but leaves the /proc/*/fd
    scan to the caller (poll() does one scan for every namespace). With ``earlier`` (a previous
    poll's table of this namespace), the per-destination data is reused instead of dumped.
    """
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
    fresh = earlier is None or settings.established == "dumped"
    sockets = _timed(
        "sockdiag",
        lambda: sockdiag.collect(
            port_range,
            inuse,
            settings.attribute_states if settings.process_attribution else (),
            dump_established=settings.established == "dumped",
            time_wait=sockstat.time_wait if sockstat is not None else None,
            destinations=fresh,
        ),
        statuses,
    )
    if sockets is not None:
        if fresh or earlier is None:
            sockets = replace(sockets, destinations_at=taken_at)
        else:
            sockets = _with_destinations_of(sockets, earlier)
    attribution: Attribution | None = None
    own_inode = _own_netns_inode(paths)
    if settings.process_attribution and scan_processes and sockets is not None:
        wanted = wanted_inodes(sockets)
        attribution = _timed(
            "processes",
            lambda: processes.scan_owners(
                paths,
                wanted,
                settings.process_scan_timeout,
                netns_inodes=own_inode,
                known=known_owners,
            ),
            statuses,
        )
    return Snapshot(
        netns=netns if netns is not None else netns_source.own_netns_name(paths),
        taken_at=taken_at,
        sockets=sockets,
        counters=counters,
        sockstat=sockstat,
        sysctls=sysctls,
        attribution=attribution,
        sources=tuple(statuses),
        # Container and pod come only from discovery (--netns); the inode is known in every mode.
        identity=NetnsIdentity(inode=next(iter(own_inode), 0)),
    )


def poll(
    settings: CollectSettings,
    selection: tuple[str, ...] = ("self",),
    paths: ProcPaths | None = None,
    run_netns_dir: str = netns_source.RUN_NETNS_DIR,
    clock: Callable[[], float] = time.time,
    known_owners: Attribution | None = None,
    earlier: Mapping[str, SocketTable] | None = None,
) -> tuple[Snapshot, ...]:
    """Snapshots of every selected namespace (`namespaces:`), with one process scan for all.

    Each namespace is polled from a thread that setns() into it, so netlink sockets, /proc/net
    and /proc/sys/net are that namespace's. One that vanished since discovery is left out
    quietly; one that cannot be entered yields a snapshot whose `netns` source failed.
    ``known_owners`` (the previous poll's attribution) spares the fd walk for sockets whose owner
    still holds them where it was found; ``earlier`` (netns name -> table) spares the
    per-destination dumps of the namespaces it names.
    """
    paths = paths or ProcPaths()
    if selection == ("self",):
        # take_snapshot() sets the identity's inode; container and pod come only from discovery
        # (--netns), which self skips.
        only = next(iter(earlier.values()), None) if earlier else None
        return (
            take_snapshot(settings, paths, clock=clock, known_owners=known_owners, earlier=only),
        )
    discovery_started = time.perf_counter()
    try:
        targets = netns_source.select(netns_source.discover(paths, run_netns_dir), selection)
    except OSError as error:
        failed = SourceStatus("netns", False, time.perf_counter() - discovery_started, str(error))
        return (_failed_snapshot(netns_source.own_netns_name(paths), clock(), failed),)
    entered = ProcPaths(root=paths.root, net_dir="thread-self/net")
    snapshots: list[Snapshot] = []
    for target in targets:
        identity = NetnsIdentity(
            target.inode, target.container, target.pod, target.pod_namespace, target.pod_uid
        )
        target_paths = paths if target.path is None else entered
        started = time.perf_counter()
        try:
            snapshot = netns_source.run_inside(
                target,
                functools.partial(
                    take_snapshot,
                    settings,
                    target_paths,
                    target.name,
                    clock,
                    scan_processes=False,
                    earlier=(earlier or {}).get(target.name),
                ),
            )
        except netns_source.NetnsGone:
            log.debug("namespace %s vanished before it was polled", target.name)
            continue
        except Exception as error:  # one namespace must not take the others down
            failed = SourceStatus("netns", False, time.perf_counter() - started, _describe(error))
            snapshots.append(
                replace(_failed_snapshot(target.name, clock(), failed), identity=identity)
            )
            continue
        entering = SourceStatus("netns", True, time.perf_counter() - started)
        snapshots.append(
            replace(snapshot, identity=identity, sources=(entering, *snapshot.sources))
        )
    if settings.process_attribution:
        snapshots = _attribute(snapshots, settings, paths, known_owners)
    return tuple(snapshots)


def _failed_snapshot(name: str, taken_at: float, status: SourceStatus) -> Snapshot:
    return Snapshot(name, taken_at, None, None, None, None, None, (status,))


def _attribute(
    snapshots: list[Snapshot],
    settings: CollectSettings,
    paths: ProcPaths,
    known_owners: Attribution | None,
) -> list[Snapshot]:
    """One /proc/*/fd scan serves every namespace: socket inodes are unique host-wide."""
    wanted: set[int] = set()
    for snapshot in snapshots:
        if snapshot.sockets is not None:
            wanted |= wanted_inodes(snapshot.sockets)
    statuses: list[SourceStatus] = []
    attribution = _timed(
        "processes",
        lambda: processes.scan_owners(
            paths,
            frozenset(wanted),
            settings.process_scan_timeout,
            netns_inodes=frozenset(s.identity.inode for s in snapshots if s.sockets is not None),
            known=known_owners,
        ),
        statuses,
    )
    return [
        replace(snapshot, attribution=attribution, sources=(*snapshot.sources, *statuses))
        if snapshot.sockets is not None
        else snapshot
        for snapshot in snapshots
    ]
