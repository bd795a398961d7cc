"""The owners that matter, described with psutil: user, start time, open fds, RLIMIT_NOFILE.

Only a few processes are described each poll: the owners of listening sockets (at most
``MAX_LISTENER_OWNERS``, the busiest first) and the ``TOP_CLOSE_WAIT`` processes holding the most
CLOSE_WAIT sockets. They come from the ``processes`` source's attribution, so nothing here walks
/proc: a poll costs one ``psutil.Process`` per owner (a stat and status read, one stat() of its fd
directory, one prlimit): about 0.1 ms; on kernels before 6.2 the fd directory is listed instead,
0.5 µs more per open fd (docs/performance.md).

Why psutil here and not in ``processes``: the fd walk must read a procfs given by
``--path.procfs`` (and fixture trees), which psutil cannot without its module-global
``PROCFS_PATH``; describing a known pid is what psutil does well (one ``oneshot()`` read of
stat/status, user names with the uid fallback, start time from the boot time, errors as
NoSuchProcess/AccessDenied). With ``--path.procfs`` naming another procfs the pids there need
not be ours, so nothing is described then (``OwnerProcesses.skipped`` says why).

RLIMIT_NOFILE comes from psutil's ``rlimit()``, which is prlimit(2): reading another user's
limit needs CAP_SYS_RESOURCE, which the shipped unit does not grant (it also lets a process raise
limits). When prlimit is refused, the limit is read from /proc/PID/limits, which is
world-readable.
"""

from __future__ import annotations

import os
import pwd
import resource
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

from tcpwatch.config import CollectSettings
from tcpwatch.model import OwnerProcess, OwnerProcesses, ProcessRef, Snapshot
from tcpwatch.paths import ProcPaths, read_bytes, read_text
from tcpwatch.sources.base import SourceContext, host_source
from tcpwatch.sources.owner_memo import STATUS_SIZE, Kept, KnownOwners, exited, real_uid

MAX_LISTENER_OWNERS = 32  # listeners' owners described per poll, most listeners first
TOP_CLOSE_WAIT = 5  # CLOSE_WAIT holders described per poll, most sockets first
LIVE_PROCFS = "/proc"
LIMITS_SIZE = 4096  # /proc/PID/limits is about 1.3 KB


@dataclass(frozen=True, slots=True)
class Interest:
    """An owner chosen to be described, with what it holds."""

    owner: ProcessRef
    listeners: int
    close_wait: int


def owners_of_interest(
    snapshots: Sequence[Snapshot],
    max_listener_owners: int = MAX_LISTENER_OWNERS,
    top_close_wait: int = TOP_CLOSE_WAIT,
) -> tuple[Interest, ...]:
    """Listeners' owners (most listeners first, then by pid), then the top CLOSE_WAIT holders
    not already chosen; counts are summed over the namespaces."""
    refs: dict[int, ProcessRef] = {}
    listeners: Counter[int] = Counter()
    close_wait: Counter[int] = Counter()
    for snapshot in snapshots:
        if snapshot.sockets is None or snapshot.attribution is None:
            continue
        attribution = snapshot.attribution
        for listener in snapshot.sockets.listeners:
            owner = attribution.owner(listener.inode)
            if owner is not None:
                refs[owner.pid] = owner
                listeners[owner.pid] += 1
        for inode in snapshot.sockets.inodes_by_state.get("close_wait", frozenset()):
            owner = attribution.owner(inode)
            if owner is not None:
                refs[owner.pid] = owner
                close_wait[owner.pid] += 1
    chosen = sorted(listeners, key=lambda pid: (-listeners[pid], pid))[:max_listener_owners]
    holders = sorted(close_wait, key=lambda pid: (-close_wait[pid], pid))
    chosen += [pid for pid in holders if pid not in chosen][:top_close_wait]
    return tuple(Interest(refs[pid], listeners[pid], close_wait[pid]) for pid in chosen)


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def _limit_field(text: str) -> int | None:
    if text == "unlimited":
        return None
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def parse_nofile_limits(text: str, path: str = "<limits>") -> tuple[int | None, int | None]:
    """RLIMIT_NOFILE's (soft, hard) from /proc/PID/limits; None for ``unlimited``.

    >>> parse_nofile_limits("Max open files     1024     524288     files")
    (1024, 524288)

    Raises ValueError naming ``path`` when the line is missing or malformed.
    """
    for line in text.splitlines():
        if line.startswith("Max open files"):
            fields = line[len("Max open files") :].split()
            try:
                return _limit_field(fields[0]), _limit_field(fields[1])
            except (IndexError, ValueError):
                raise ValueError(f"{path}: malformed line {line!r}") from None
    raise ValueError(f"{path}: no 'Max open files' line")


def _count_fds(paths: ProcPaths, pid: int) -> int:
    """Open descriptors of ``pid`` without listing them: since Linux 6.2 the size stat() reports
    for /proc/PID/fd is the count (fs/proc/fd.c, proc_fd_getattr). 0 on older kernels, where the
    caller lists the directory instead (psutil's num_fds, 0.5 us per descriptor)."""
    try:
        return os.stat(paths.pid(pid, "fd")).st_size
    except OSError:
        return 0


def describe(item: Interest, paths: ProcPaths, known: KnownOwners | None = None) -> OwnerProcess:
    """One owner, read with psutil, or from what ``known`` kept of it while it lives (then only
    its uid, fd count and limit are read again). Raises psutil.Error when it exited or is denied
    to us."""
    pid = item.owner.pid
    kept = known.get(pid) if known is not None else None
    if kept is not None and known is not None:
        again = _read_again(item, paths, kept)
        if again is not None:
            return again
        known.drop(pid)  # it exited meanwhile: described afresh (psutil says how it ended)
    pidfd = known.open(pid) if known is not None else None
    try:
        described, uid = _describe(item, paths)
    except BaseException:
        if pidfd is not None:
            os.close(pidfd)
        raise
    if pidfd is not None and known is not None:
        known.keep(pid, pidfd, described.started_at, uid, described.user)
    return described


def _describe(item: Interest, paths: ProcPaths) -> tuple[OwnerProcess, int]:
    process = psutil.Process(item.owner.pid)
    with process.oneshot():
        user = process.username()
        uid = process.uids().real
        started_at = process.create_time()
        open_fds = _count_fds(paths, item.owner.pid) or process.num_fds()
        try:
            soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
            max_fds, max_fds_hard = _limit(soft), _limit(hard)
        except psutil.AccessDenied:  # prlimit wants CAP_SYS_RESOURCE for another user's process
            max_fds, max_fds_hard = _limits_file(paths, item.owner.pid)
    return _owner(item, user, started_at, open_fds, max_fds, max_fds_hard), uid


def _limits_file(paths: ProcPaths, pid: int) -> tuple[int | None, int | None]:
    path = paths.pid(pid, "limits")
    try:
        return parse_nofile_limits(read_text(path, LIMITS_SIZE), path)
    except FileNotFoundError as error:
        raise psutil.NoSuchProcess(pid) from error


def _read_again(item: Interest, paths: ProcPaths, kept: Kept) -> OwnerProcess | None:
    """What can change of a kept owner, read as psutil reads it; None when the process exited
    (the pidfd is checked after the reads, so they were of the process ``kept`` describes)."""
    pid = item.owner.pid
    try:
        uid = real_uid(read_bytes(paths.pid(pid, "status"), STATUS_SIZE))
        open_fds = _count_fds(paths, pid) or len(os.listdir(paths.pid(pid, "fd")))
        try:
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            max_fds, max_fds_hard = _limit(soft), _limit(hard)
        except PermissionError:  # as psutil's AccessDenied in _describe
            max_fds, max_fds_hard = _limits_file(paths, pid)
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None
    if exited(kept.pidfd):
        return None
    user = kept.user if uid == kept.uid else _user_name(uid)
    return _owner(item, user, kept.started_at, open_fds, max_fds, max_fds_hard)


def _user_name(uid: int) -> str:
    """As psutil's username(): the password database's name, else the uid as text."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _owner(
    item: Interest,
    user: str,
    started_at: float,
    open_fds: int,
    max_fds: int | None,
    max_fds_hard: int | None,
) -> OwnerProcess:
    return OwnerProcess(
        pid=item.owner.pid,
        name=item.owner.name,
        user=user,
        started_at=started_at,
        open_fds=open_fds,
        max_fds=max_fds,
        max_fds_hard=max_fds_hard,
        listeners=item.listeners,
        close_wait=item.close_wait,
    )


def describe_owners(
    wanted: Sequence[Interest], paths: ProcPaths, known: KnownOwners | None = None
) -> OwnerProcesses:
    """Describe each wanted owner; one that exited or is denied is counted, not raised.
    ``known`` (serve) keeps what cannot change of each between calls."""
    if os.path.realpath(paths.root) != LIVE_PROCFS:
        reason = f"psutil reads {LIVE_PROCFS}, and pids under {paths.root} need not be ours"
        return OwnerProcesses({}, len(wanted), skipped=reason)
    described: dict[int, OwnerProcess] = {}
    failed = 0
    for item in wanted:
        try:
            described[item.owner.pid] = describe(item, paths, known)
        except psutil.Error:  # NoSuchProcess (exited since the scan), AccessDenied
            failed += 1
    if known is not None:
        known.retain(item.owner.pid for item in wanted)
    return OwnerProcesses(described, len(wanted), failed)


def _attribution_on(settings: CollectSettings) -> bool:
    return settings.process_attribution


@host_source(
    "owners", field="owner_processes", order=60, needs=("processes",), enabled=_attribution_on
)
def read_owners_source(context: SourceContext, snapshots: Sequence[Snapshot]) -> OwnerProcesses:
    """The listeners' owners and top CLOSE_WAIT holders of every namespace, described once."""
    known = context.memo.owners if context.memo is not None else None
    return describe_owners(owners_of_interest(snapshots), context.paths, known)
