"""Families of the ``owners`` source: the described socket owners (psutil).

Labels stay bounded: only the owners the source describes (listeners' owners and the top
CLOSE_WAIT holders), each in the namespaces where it holds them.

A series is one process *name* in a namespace, never a pid: a restarted service keeps its series
(and an alert on them keeps firing instead of resolving and firing again). Several described
processes of one name (nginx workers each owning a SO_REUSEPORT listener, gunicorn workers
holding CLOSE_WAIT sockets) share it, as process-exporter's name groups do: the descriptor
gauges are those of the process nearest its soft limit, so ``open_fds / max_fds`` is the worst
ratio among them; the start time and user are the oldest one's, which a worker's replacement does
not move. The pid of a listener's owner is on ``tcpwatch_listener_info`` (sockdiag's families).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import Metric

from tcpwatch.model import OwnerProcess, Snapshot
from tcpwatch.render.families.base import family, gauge
from tcpwatch.state import ExportState

LABELS = ["netns", "process"]


def owner_pids(snapshot: Snapshot) -> list[int]:
    """The described owners holding a listener or a CLOSE_WAIT socket in this namespace."""
    described = snapshot.owner_processes
    if described is None or snapshot.sockets is None or snapshot.attribution is None:
        return []
    inodes = [listener.inode for listener in snapshot.sockets.listeners]
    inodes += snapshot.sockets.inodes_by_state.get("close_wait", frozenset())
    pids = {owner.pid for inode in inodes if (owner := snapshot.attribution.owner(inode))}
    return sorted(pid for pid in pids if described.get(pid) is not None)


def owners_by_name(snapshot: Snapshot) -> dict[str, list[OwnerProcess]]:
    """Process name -> the described owners of that name in this namespace, by pid."""
    described = snapshot.owner_processes
    groups: dict[str, list[OwnerProcess]] = {}
    if described is None:
        return groups
    for pid in owner_pids(snapshot):
        process = described.processes[pid]
        groups.setdefault(process.name, []).append(process)
    return groups


def nearest_limit(processes: Sequence[OwnerProcess]) -> OwnerProcess:
    """The process with the highest open/soft-limit ratio (unlimited: 0), then the most open
    descriptors, then the lowest pid."""

    def key(process: OwnerProcess) -> tuple[float, int, int]:
        ratio = process.open_fds / process.max_fds if process.max_fds else 0.0
        return (-ratio, -process.open_fds, process.pid)

    return min(processes, key=key)


def oldest(processes: Sequence[OwnerProcess]) -> OwnerProcess:
    return min(processes, key=lambda process: (process.started_at, process.pid))


@family(source="owners", order=80)
def owner_families(state: ExportState) -> Iterator[Metric]:
    each = (
        " One series per process name: of several described processes of one name, the one "
        "nearest its soft limit."
    )
    open_fds = gauge(
        "tcpwatch_process_open_fds",
        "Open file descriptors of a listener's owner or a top CLOSE_WAIT holder." + each,
        LABELS,
        state,
    )
    max_fds = gauge(
        "tcpwatch_process_max_fds",
        "RLIMIT_NOFILE soft limit of the same process (absent when unlimited); at it, "
        "accept() fails with EMFILE.",
        LABELS,
        state,
    )
    max_fds_hard = gauge(
        "tcpwatch_process_max_fds_hard",
        "RLIMIT_NOFILE hard limit of the same process (absent when unlimited): how far the "
        "process may raise its soft limit itself.",
        LABELS,
        state,
    )
    started = gauge(
        "tcpwatch_process_start_time_seconds",
        "Start time (unix time) of the oldest described process of that name; user is the user "
        "it runs as.",
        [*LABELS, "user"],
        state,
    )
    for snap in state.snapshots:
        for name, processes in sorted(owners_by_name(snap).items()):
            labels = [snap.netns, name]
            nearest = nearest_limit(processes)
            open_fds.add_metric(labels, nearest.open_fds)
            if nearest.max_fds is not None:
                max_fds.add_metric(labels, nearest.max_fds)
            if nearest.max_fds_hard is not None:
                max_fds_hard.add_metric(labels, nearest.max_fds_hard)
            first = oldest(processes)
            started.add_metric([*labels, first.user], first.started_at)
    yield from (open_fds, max_fds, max_fds_hard, started)
