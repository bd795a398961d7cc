"""Families of the ``processes`` source (one /proc/*/fd walk): sockets per owning process, and
whether the walk saw everything."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.model import Snapshot
from tcpwatch.render.families.base import NETNS, family, gauge
from tcpwatch.state import ExportState


def process_socket_counts(snapshot: Snapshot) -> Counter[tuple[str, str]]:
    """(process name, state) -> attributed sockets, listeners included."""
    counts: Counter[tuple[str, str]] = Counter()
    if snapshot.sockets is None or snapshot.attribution is None:
        return counts
    owners = snapshot.attribution.owners
    for listener in snapshot.sockets.listeners:
        owner = owners.get(listener.inode)
        if owner is not None:
            counts[(owner.name, "listen")] += 1
    for state, inodes in snapshot.sockets.inodes_by_state.items():
        for inode in inodes:
            owner = owners.get(inode)
            if owner is not None:
                counts[(owner.name, state)] += 1
    return counts


@family(source="processes", order=70)
def process_families(state: ExportState) -> Iterator[Metric]:
    sockets = gauge(
        "tcpwatch_process_sockets",
        "Sockets attributed to a process name (listeners and the states chosen in "
        "collect.attribute_states), for the processes holding the most.",
        ["netns", "process", "state"],
        state,
    )
    complete = gauge(
        "tcpwatch_process_scan_complete",
        "1 if the latest /proc/*/fd scan found the owner of every wanted socket or read every "
        "process; 0 if processes were denied to it (missing CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH) "
        "or it hit collect.process_scan_timeout.",
        NETNS,
        state,
    )
    denied = gauge(
        "tcpwatch_process_scan_denied_processes",
        "Processes whose file descriptors the latest scan was not allowed to read.",
        NETNS,
        state,
    )
    for snap in state.snapshots:
        if snap.attribution is not None:
            complete.add_metric([snap.netns], 1 if snap.attribution.complete else 0)
            denied.add_metric([snap.netns], snap.attribution.processes_denied)
        counts = process_socket_counts(snap)
        per_process: Counter[str] = Counter()
        for (name, _), count in counts.items():
            per_process[name] += count
        top = {name for name, _ in per_process.most_common(state.top_processes)}
        for (name, socket_state), count in sorted(counts.items()):
            if name in top:
                sockets.add_metric([snap.netns, name, socket_state], count)
    yield from (sockets, complete, denied)
