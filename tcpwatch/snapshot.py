"""Snapshots of namespaces: every registered source, timed, its failure recorded, never raising.

``take_snapshot`` reads one namespace (the one this thread is in); ``poll`` reads every selected
namespace from a thread inside each, then runs the host-wide sources once for all of them.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from tcpwatch.config import CollectSettings
from tcpwatch.errors import describe_error
from tcpwatch.gathering import HOST, Gathering
from tcpwatch.model import Attribution, NetnsIdentity, Snapshot, SocketTable, SourceStatus
from tcpwatch.paths import ProcPaths
from tcpwatch.sources import netns as netns_source
from tcpwatch.sources.base import (
    AnySource,
    FileMemo,
    HostLongLivedSource,
    LongLivedSource,
    Partial,
    Source,
    SourceContext,
)
from tcpwatch.sources.registry import ENTERING, registered_sources

log = logging.getLogger(__name__)


def _wanted(sources: Sequence[AnySource], settings: CollectSettings) -> list[AnySource]:
    return [
        source
        for source in sources
        if source.name not in settings.disabled_sources and source.enabled(settings)
    ]


def _needs_met(source: AnySource, snapshot: Snapshot) -> bool:
    return all(snapshot.source_ok(need) for need in source.needs)


def _timed(
    source: Source, context: SourceContext, so_far: Sequence[Snapshot]
) -> tuple[object | None, SourceStatus]:
    """The one wrapper every source runs in: timed, and a failure recorded, never raised."""
    started = time.perf_counter()
    try:
        value = source.read(context, so_far)
    except Exception as error:  # a source must never take the poll down with it
        log.debug("source %s failed", source.name, exc_info=True)
        elapsed = time.perf_counter() - started
        return None, SourceStatus(source.name, False, elapsed, describe_error(error))
    elapsed = time.perf_counter() - started
    if isinstance(value, Partial):
        return value.value, SourceStatus(source.name, True, elapsed, skipped=value.skipped)
    return value, SourceStatus(source.name, True, elapsed)


def _with(snapshot: Snapshot, source: AnySource, value: object, status: SourceStatus) -> Snapshot:
    # Any: the field is named by the source's declaration; the registry's tests check each
    # source's value type against its field.
    changes: dict[str, Any] = {"sources": (*snapshot.sources, status)}
    if source.field is not None and value is not None:
        changes[source.field] = value
    return replace(snapshot, **changes)


def _own_netns_inode(paths: ProcPaths) -> int:
    """The namespace this *thread* is in: poll() reads other namespaces from threads that
    setns() into them, where /proc/self still names the process' own (and long-lived sources
    are keyed by this inode)."""
    try:
        return os.stat(paths.pid("thread-self", "ns", "net")).st_ino
    except OSError:
        pass
    try:
        return netns_source.current_netns_inode(paths)
    except OSError:
        return 0


def _read_namespace(
    context: SourceContext,
    sources: Sequence[AnySource],
    gathering: Gathering | None,
) -> Snapshot:
    """The namespace sources (and long-lived drains) in order, into one snapshot."""
    snapshot = Snapshot(context.netns, context.taken_at, None, None, None, None, None)
    snapshot = replace(snapshot, identity=NetnsIdentity(inode=context.netns_inode))
    for source in sources:
        if isinstance(source, HostLongLivedSource) or source.scope == "host":
            continue
        if not _needs_met(source, snapshot):
            continue  # what it needs failed: that failure is reported, this one would repeat it
        if isinstance(source, LongLivedSource):
            if gathering is None:
                continue  # one-shot commands hear nothing between polls
            key = (context.netns_inode, source.name)
            started = time.perf_counter()
            try:
                gathering.ensure(key, source, context)
            except Exception as error:  # start failed: reported, tried again next poll
                log.debug("starting source %s failed", source.name, exc_info=True)
                failed = SourceStatus(
                    source.name, False, time.perf_counter() - started, describe_error(error)
                )
                snapshot = _with(snapshot, source, None, failed)
                continue
            value, status = gathering.drain(key, source.name, snapshot)
            snapshot = _with(snapshot, source, value, status)
            continue
        value, status = _timed(source, context, (snapshot,))
        snapshot = _with(snapshot, source, value, status)
    return snapshot


def _read_host_wide(
    snapshots: list[Snapshot],
    sources: Sequence[AnySource],
    context: SourceContext,
    gathering: Gathering | None = None,
) -> list[Snapshot]:
    """Host sources: one read for every namespace whose needs were met; each of those gets the
    value and the status (a host-wide long-lived source: its value for that namespace)."""
    for source in sources:
        if isinstance(source, HostLongLivedSource):
            if gathering is None:
                continue  # one-shot commands hear nothing between polls
        elif not isinstance(source, Source) or source.scope != "host":
            continue
        served = [i for i, snapshot in enumerate(snapshots) if _needs_met(source, snapshot)]
        if not served:
            continue
        chosen = [snapshots[i] for i in served]
        if isinstance(source, HostLongLivedSource):
            assert gathering is not None
            shares, status = _drain_host(source, context, chosen, gathering)
            for i in served:
                share = shares.get(snapshots[i].identity.inode) if shares is not None else None
                snapshots[i] = _with(snapshots[i], source, share, status)
            continue
        value, status = _timed(source, context, chosen)
        for i in served:
            snapshots[i] = _with(snapshots[i], source, value, status)
    return snapshots


def _drain_host(
    source: HostLongLivedSource,
    context: SourceContext,
    snapshots: Sequence[Snapshot],
    gathering: Gathering,
) -> tuple[Mapping[int, object] | None, SourceStatus]:
    """Start (in tcpwatch's own namespace: this thread never entered another) and drain."""
    key = (HOST, source.name)
    started = time.perf_counter()
    try:
        gathering.ensure(key, source, context)
    except Exception as error:  # start failed: reported, tried again next poll
        log.debug("starting source %s failed", source.name, exc_info=True)
        elapsed = time.perf_counter() - started
        return None, SourceStatus(source.name, False, elapsed, describe_error(error))
    return gathering.drain_host(key, source.name, snapshots)


def take_snapshot(
    settings: CollectSettings,
    paths: ProcPaths | None = None,
    netns: str | None = None,
    clock: Callable[[], float] = time.time,
    scan_processes: bool = True,
    known_owners: Attribution | None = None,
    earlier: SocketTable | None = None,
    gathering: Gathering | None = None,
    sources: Sequence[AnySource] | None = None,
    sysctl_names: tuple[str, ...] = (),
    previous: Snapshot | None = None,
    memo: FileMemo | None = None,
) -> Snapshot:
    """One poll of the namespace that ``paths`` (and this thread's netlink sockets) see.

    ``scan_processes=False`` leaves the host-wide sources (the /proc/*/fd walk) to the caller
    (poll() runs them once for every namespace). With ``earlier`` (a previous poll's table of
    this namespace), the per-destination data is reused instead of dumped. ``gathering`` runs
    the long-lived sources; without it they are left out.
    """
    paths = paths or ProcPaths()
    chosen = _wanted(registered_sources() if sources is None else sources, settings)
    context = SourceContext(
        paths=paths,
        settings=settings,
        netns=netns if netns is not None else netns_source.own_netns_name(paths),
        netns_inode=_own_netns_inode(paths),
        taken_at=clock(),
        sysctl_names=sysctl_names,
        earlier=earlier,
        known_owners=known_owners,
        previous=previous,
        memo=memo,
    )
    snapshot = _read_namespace(context, chosen, gathering)
    if not scan_processes:
        return snapshot
    return _read_host_wide([snapshot], chosen, context, gathering)[0]


def poll(
    settings: CollectSettings,
    selection: tuple[str, ...] = ("self",),
    paths: ProcPaths | None = None,
    run_netns_dir: str = netns_source.RUN_NETNS_DIR,
    clock: Callable[[], float] = time.time,
    known_owners: Attribution | None = None,
    earlier: Mapping[str, SocketTable] | None = None,
    gathering: Gathering | None = None,
    sysctl_names: tuple[str, ...] = (),
    names: netns_source.NetnsNames | None = None,
    sources: Sequence[AnySource] | None = None,
    previous: Mapping[str, Snapshot] | None = None,
    owner_hints: Attribution | None = None,
    memo: FileMemo | None = None,
) -> tuple[Snapshot, ...]:
    """Snapshots of every selected namespace (`namespaces:`), with one process scan for all.

    Each namespace is polled from a thread that setns() into it, so netlink sockets, /proc/net
    and /proc/sys/net are that namespace's. One that vanished since discovery is left out
    quietly; one that cannot be entered yields a snapshot whose `netns` source failed.
    ``known_owners`` (the previous poll's attribution) spares the fd walk for sockets whose owner
    still holds them where it was found; ``earlier`` (netns name -> table) spares the
    per-destination dumps of the namespaces it names. ``names`` (the previous polls' names)
    keeps a namespace's name across a transient procfs failure. ``previous`` (netns name ->
    the previous poll's snapshot) lets a source on the per-destination cadence reuse its value.
    ``owner_hints`` (where another process says the owners are) is confirmed like
    ``known_owners``, one readlink each, before any walk.
    ``memo`` keeps what the host-wide sources read of rarely changing files between polls.
    """
    names = names if names is not None else netns_source.NetnsNames()
    paths = paths or ProcPaths()
    sources = _wanted(registered_sources() if sources is None else sources, settings)
    take = functools.partial(
        take_snapshot,
        settings,
        clock=clock,
        scan_processes=False,
        known_owners=known_owners,
        gathering=gathering,
        sources=sources,
        sysctl_names=sysctl_names,
        memo=memo,
    )
    host_context = SourceContext(
        paths,
        settings,
        "",
        0,
        clock(),
        sysctl_names,
        known_owners=known_owners,
        owner_hints=owner_hints,
        memo=memo,
    )
    if selection == ("self",):
        # The identity's inode is set from inside; container and pod come only from discovery
        # (--netns), which self skips.
        only = next(iter(earlier.values()), None) if earlier else None
        name = _own_name(paths, names)
        before = (previous or {}).get(name)
        snapshot = take(paths, name, earlier=only, previous=before)
        return tuple(_read_host_wide([snapshot], sources, host_context, gathering))
    discovery_started = time.perf_counter()
    try:
        targets_found = netns_source.discover(paths, run_netns_dir)
    except OSError as error:
        failed = SourceStatus(
            ENTERING, False, time.perf_counter() - discovery_started, describe_error(error)
        )
        return (_failed_snapshot(_own_name(paths, names), clock(), failed),)
    targets = _settled(targets_found, names)
    names.keep({target.inode for target in targets})
    targets = netns_source.select(targets, selection)
    entered = replace(paths, net_dir="thread-self/net")
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
                    take,
                    target_paths,
                    target.name,
                    earlier=(earlier or {}).get(target.name),
                    previous=(previous or {}).get(target.name),
                ),
            )
        except netns_source.NetnsGone:
            log.debug("namespace %s vanished before it was polled", target.name)
            continue
        except Exception as error:  # one namespace must not take the others down
            failed = SourceStatus(
                ENTERING, False, time.perf_counter() - started, describe_error(error)
            )
            snapshots.append(
                replace(_failed_snapshot(target.name, clock(), failed), identity=identity)
            )
            continue
        entering = SourceStatus(ENTERING, True, time.perf_counter() - started)
        snapshots.append(
            replace(snapshot, identity=identity, sources=(entering, *snapshot.sources))
        )
    return tuple(_read_host_wide(snapshots, sources, host_context, gathering))


OWNER_SOURCE = "processes"  # the /proc/*/fd walk: socket inode -> owner


def owner_sources(sources: Sequence[AnySource]) -> tuple[AnySource, ...]:
    """The owner source and every source that needs it (the owners' description), in order."""
    names = {OWNER_SOURCE}
    chosen: list[AnySource] = []
    for source in sources:  # the registry's order: what a source needs comes before it
        if source.name in names or names.intersection(source.needs):
            names.add(source.name)
            chosen.append(source)
    return tuple(chosen)


def attribute(
    snapshots: Sequence[Snapshot],
    settings: CollectSettings,
    paths: ProcPaths,
    sources: Sequence[AnySource],
    owner_inodes: frozenset[int] | None,
    known_owners: Attribution | None = None,
    owner_hints: Attribution | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[Snapshot, ...]:
    """``snapshots`` (polled without ``sources``, the :func:`owner_sources`) with them run now,
    looking for the owners of ``owner_inodes`` only (None: every candidate). What an earlier run
    of them left (value and status) is replaced. ``known_owners`` and ``owner_hints`` as for
    :func:`poll`."""
    chosen = _wanted(sources, settings)
    names = {source.name for source in chosen}
    # Any: the fields are named by the sources' declarations (see _with).
    emptied: dict[str, Any] = {source.field: None for source in chosen if source.field is not None}
    cleared = [
        replace(
            snapshot,
            sources=tuple(s for s in snapshot.sources if s.name not in names),
            **emptied,
        )
        for snapshot in snapshots
    ]
    context = SourceContext(
        paths,
        settings,
        "",
        0,
        clock(),
        known_owners=known_owners,
        owner_hints=owner_hints,
        owner_inodes=owner_inodes,
    )
    return tuple(_read_host_wide(cleared, chosen, context))


def _own_name(paths: ProcPaths, names: netns_source.NetnsNames) -> str:
    """The name of the namespace tcpwatch runs in, kept across a transient procfs failure."""
    return names.settle(_own_netns_inode(paths), netns_source.own_netns_name(paths), own=True)


def _settled(
    targets: tuple[netns_source.NetnsTarget, ...], names: netns_source.NetnsNames
) -> tuple[netns_source.NetnsTarget, ...]:
    """Discovered namespaces under the names they had (before selecting: a pattern matches the
    name series carry). Two that would then share a name keep their fresh, unique names."""
    settled = [replace(t, name=names.settle(t.inode, t.name, own=t.path is None)) for t in targets]
    counts = Counter(t.name for t in settled)
    return tuple(
        new if counts[new.name] == 1 else old for new, old in zip(settled, targets, strict=True)
    )


def _failed_snapshot(name: str, taken_at: float, status: SourceStatus) -> Snapshot:
    return Snapshot(name, taken_at, None, None, None, None, None, (status,))
