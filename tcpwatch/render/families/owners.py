"""Families of the ``owners`` source: the described socket owners (psutil).

Labels stay bounded: only the owners the source describes (listeners' owners and the top
CLOSE_WAIT holders), each in the namespaces where it holds them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.model import Snapshot
from tcpwatch.render.families.base import family, gauge
from tcpwatch.state import ExportState

LABELS = ["netns", "process", "pid"]


def owner_pids(snapshot: Snapshot) -> list[int]:
    """The described owners holding a listener or a CLOSE_WAIT socket in this namespace."""
    described = snapshot.owner_processes
    if described is None or snapshot.sockets is None or snapshot.attribution is None:
        return []
    inodes = [listener.inode for listener in snapshot.sockets.listeners]
    inodes += snapshot.sockets.inodes_by_state.get("close_wait", frozenset())
    pids = {owner.pid for inode in inodes if (owner := snapshot.attribution.owner(inode))}
    return sorted(pid for pid in pids if described.get(pid) is not None)


@family(source="owners", order=80)
def owner_families(state: ExportState) -> Iterator[Metric]:
    open_fds = gauge(
        "tcpwatch_process_open_fds",
        "Open file descriptors of a listener's owner or a top CLOSE_WAIT holder.",
        LABELS,
        state,
    )
    max_fds = gauge(
        "tcpwatch_process_max_fds",
        "RLIMIT_NOFILE soft limit of the same processes (absent when unlimited); at it, "
        "accept() fails with EMFILE.",
        LABELS,
        state,
    )
    max_fds_hard = gauge(
        "tcpwatch_process_max_fds_hard",
        "RLIMIT_NOFILE hard limit of the same processes (absent when unlimited): how far the "
        "process may raise its soft limit itself.",
        LABELS,
        state,
    )
    started = gauge(
        "tcpwatch_process_start_time_seconds",
        "Start time of the same processes (unix time); user is the user it runs as.",
        [*LABELS, "user"],
        state,
    )
    for snap in state.snapshots:
        described = snap.owner_processes
        if described is None:
            continue
        for pid in owner_pids(snap):
            process = described.processes[pid]
            labels = [snap.netns, process.name, str(pid)]
            open_fds.add_metric(labels, process.open_fds)
            if process.max_fds is not None:
                max_fds.add_metric(labels, process.max_fds)
            if process.max_fds_hard is not None:
                max_fds_hard.add_metric(labels, process.max_fds_hard)
            started.add_metric([*labels, process.user], process.started_at)
    yield from (open_fds, max_fds, max_fds_hard, started)
