"""Socket inode -> owning process, from the fd links under /proc/PID/fd.

Each open socket of a process appears as a symlink whose target names the socket's inode, the
same inode sock_diag reports (``inet_diag_msg.idiag_inode``)::

    /proc/812/fd/7 -> socket:[48213]
    /proc/812/fd/8 -> pipe:[48220]
    /proc/812/comm    "nginx\\n"

``ss -p`` reads every fd of every process, which made it 13x slower than ``ss`` on the baseline
population. The scan here only looks for the inodes it is asked about and stops as soon as it has
found them all, or when its deadline passes.

When several processes share one socket (a listener inherited across fork, prefork workers)
the owner kept is the first sharer the walk reads: it reads the likeliest holders first (see
``scan_owners``), smaller fd tables first among equals (fdwalk.py), then ascending pids, so it
is usually the parent that opened it, the last one ``ss -p`` prints (it prepends each owner it
finds while walking /proc in ascending order). Every owner kept holds the socket; S01 and the
reports group a program's processes together, so which sharer is named does not change them.

Names come from /proc/PID/comm: the kernel's 15-character task name, as ``ss -p`` shows it.

psutil is not used here, on purpose: everything is read through ``ProcPaths``, so one code path
serves the live host, a host procfs mounted elsewhere (``--path.procfs``) and unit-test fixture
trees, without setting the module-global ``psutil.PROCFS_PATH``. psutil's ``name()`` would also
differ from ``ss``: it replaces a 15-character comm with the longer name from the command line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import replace

from tcpwatch.config import CollectSettings
from tcpwatch.model import Attribution, ProcessRef, Snapshot, SocketTable
from tcpwatch.paths import ProcPaths, read_bytes, read_text
from tcpwatch.sources.base import SourceContext, host_source
from tcpwatch.sources.fdwalk import (
    SOCKET_PREFIX,
    counts_fds,
    ranked,
    socket_links,
    table_size_class,
    wanted_sockets_in,
)

COMM_LIMIT = 64  # /proc/PID/comm holds TASK_COMM_LEN (16) bytes and a newline
_log = logging.getLogger(__name__)


def parse_socket_link(link: str, path: str = "<fd link>") -> int | None:
    """The inode in an fd link target, or None when the fd is not a socket.

    >>> parse_socket_link("socket:[48213]")
    48213
    >>> parse_socket_link("pipe:[48220]") is None
    True

    A ``socket:[`` link that does not hold a decimal inode raises ValueError naming ``path`` and
    the offending text.
    """
    if not link.startswith(SOCKET_PREFIX):
        return None
    digits = link[len(SOCKET_PREFIX) : -1]
    if not link.endswith("]") or not digits.isdigit():
        raise ValueError(f"{path}: malformed socket link {link!r}, expected 'socket:[INODE]'")
    return int(digits)


def parse_comm(data: bytes) -> str:
    """The task name in /proc/PID/comm (``b"nginx\\n"`` -> ``"nginx"``).

    The kernel stores raw bytes; undecodable ones are replaced so the name is safe as a label.
    """
    return data.rstrip(b"\n").decode("utf-8", errors="replace")


def confirm_known_owners(
    paths: ProcPaths, wanted: Set[int], known: Attribution
) -> tuple[dict[int, ProcessRef], dict[int, tuple[int, str]]]:
    """Owners of ``wanted`` still holding the socket where ``known`` last found it.

    One readlink per socket: an fd that still links to ``socket:[INODE]`` is the same socket in
    the same process (inodes are unique while the socket lives). Names are re-read, once per pid,
    since a process may exec or rename itself. Each pid's fd directory is opened once and its
    links read relative to it: every poll of a busy host confirms ~150 sockets of a few
    processes, and a full /proc/PID/fd/N path made and looked up per socket cost more than the
    readlink itself (docs/performance.md).
    """
    owners: dict[int, ProcessRef] = {}
    locations: dict[int, tuple[int, str]] = {}
    names: dict[int, str | None] = {}
    directories: dict[int, int | None] = {}  # pid -> its fd directory, None: not readable
    readlink = os.readlink
    try:
        for inode in wanted:
            location = known.locations.get(inode)
            if location is None:
                continue
            pid, fd = location
            directory = directories.get(pid, -1)
            if directory == -1:
                directory = directories[pid] = _open_directory(paths.pid(pid, "fd"))
            if directory is None:
                continue
            try:
                if readlink(fd, dir_fd=directory) != f"socket:[{inode}]":
                    continue
            except OSError:
                continue
            if pid not in names:
                try:
                    names[pid] = parse_comm(read_bytes(paths.pid(pid, "comm"), COMM_LIMIT))
                except OSError:
                    names[pid] = None
            name = names[pid]
            if name is not None:
                owners[inode] = ProcessRef(pid=pid, name=name)
                locations[inode] = location
    finally:
        for directory in directories.values():
            if directory is not None:
                os.close(directory)
    return owners, locations


def _open_directory(path: str) -> int | None:
    """A descriptor of the directory at ``path``, or None when it cannot be opened (the
    process exited, or its fds are not ours to read)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


CAP_SYS_PTRACE = 19


def procfs_hides_processes(paths: ProcPaths) -> bool:
    """True when the procfs at ``paths.root`` is mounted with hidepid and we cannot see past it.

    mountinfo's super options carry ``hidepid=`` (``invisible``/``ptraceable``/``noaccess`` or
    1/2/4); a process with CAP_SYS_PTRACE passes the check that hides the others.
    """
    try:
        mountinfo = paths.pid("self", "mountinfo")
        mounts = read_text(mountinfo, encoding="utf-8", errors="replace").splitlines()
        status_path = paths.pid("self", "status")
        status = read_text(status_path, encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False
    root = os.path.realpath(paths.root)
    hiding = False
    for line in mounts:
        fields = line.split()
        if len(fields) < 5 or fields[4] != root or " - proc " not in line:
            continue
        options = line.rsplit(" ", 1)[-1].split(",")
        hiding = any(
            option.startswith("hidepid=") and option not in ("hidepid=0", "hidepid=off")
            for option in options
        )
    if not hiding:
        return False
    effective = next((line.split()[1] for line in status if line.startswith("CapEff:")), "0")
    return not int(effective, 16) & (1 << CAP_SYS_PTRACE)


class NoProcesses(Exception):
    """The procfs lists no process at all: not a procfs (--path.procfs), or not mounted. Every
    socket would look ownerless, so the source is down rather than "complete"."""


def _scan_order(
    paths: ProcPaths,
    netns_inodes: frozenset[int],
    uids: frozenset[int] = frozenset(),
    size_class: Callable[[int], int] | None = None,
) -> list[int]:
    """The likeliest owners first (see scan_owners): members of ``netns_inodes`` running as
    one of ``uids``, then the other members, then the rest; within each, the smaller fd tables
    first when ``size_class`` (pid -> class, see fdwalk.ranked) is given, then ascending pids."""
    pids = paths.list_pids()
    if not pids:  # even with hidepid, our own process is listed
        raise NoProcesses(f"{paths.root} lists no process (is it a procfs? see --path.procfs)")

    def rank(pid: int) -> int:
        rank = 0
        if netns_inodes:
            try:
                inode = os.stat(paths.pid(pid, "ns", "net")).st_ino
            except OSError:
                inode = 0
            rank += 0 if inode in netns_inodes else 2
        if uids:
            try:
                uid = os.stat(paths.pid(pid)).st_uid  # the task's euid (root if not dumpable)
            except OSError:
                uid = -1
            rank += 0 if uid in uids else 1
        return rank

    return ranked(pids, rank, size_class)


def resume_order(order: Sequence[int], walked: Set[int]) -> list[int]:
    """``order`` with the pids a cut walk already read (``walked``) moved to the end, each part
    keeping its order: the next walk carries on where the cut one stopped instead of re-reading
    the same processes into the same deadline every poll.

    >>> resume_order([1, 2, 3, 4], {1, 2})
    [3, 4, 1, 2]
    """
    if not walked:
        return list(order)
    return [pid for pid in order if pid not in walked] + [pid for pid in order if pid in walked]


def scan_owners(
    paths: ProcPaths,
    wanted: frozenset[int],
    deadline_seconds: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    netns_inodes: frozenset[int] = frozenset(),
    known: Attribution | None = None,
    uids: frozenset[int] = frozenset(),
) -> Attribution:
    """Find the process owning each inode of ``wanted``; never raises for a process.

    Stops as soon as every wanted inode has an owner, or when ``deadline_seconds`` have passed
    (checked before each process, so one process' fd table can overrun it). Processes that exit
    mid-scan or whose fds we may not read are skipped and counted. Inode 0 (TIME_WAIT and request
    sockets) has no owner and is ignored.

    ``complete`` is True when every wanted inode was found, or when every process was read: then
    an inode without an owner belongs to no process. A process denied to us (or the deadline)
    leaves it False. The denied count is kept in Attribution.processes_denied; exits are only
    logged at debug level.

    Processes in the network namespaces ``netns_inodes`` are read first: a socket is nearly
    always held by a process of its own namespace, so the early stop comes sooner and a
    deadline hit on a host with huge fd tables elsewhere still finds the owners that matter.
    Among them, processes running as one of ``uids`` (the sockets' idiag_uid: the user that
    made them) come first: one stat per process can spare reading other users' fd tables.
    Within each of these groups, on the live procfs, the smaller fd tables come first (a size
    class of a factor of two, one stat each; fdwalk.py): the walk stops once every wanted socket
    is found, so a server holding them is read before a process holding 100,000 other sockets.

    ``known`` (the previous scan) is checked first, one readlink per socket; the walk runs only
    for sockets not found there, so a steady host costs a readlink per attributed socket.

    A walk cut by the deadline records the pids it read (``walked``); the next scan given it as
    ``known`` reads the other processes first, then the rest, so the owners are all found within
    a few polls even when one walk never fits in the deadline. Owners found by a cut walk are
    kept only through ``known``'s locations, re-checked each poll: a process gone, or a socket
    closed, loses its owner. While walks are being resumed, a socket shared between a process
    already read and one not yet read can be kept under the later one instead of the first in
    order.

    Links are compared whole with ``socket:[INODE]`` of each wanted inode, so a link the kernel
    never writes (a malformed ``socket:[``) is no wanted socket. Raises NoProcesses when the walk
    is needed and ``paths.root`` lists no process.
    """
    missing = set(wanted)
    missing.discard(0)
    if not missing:
        return Attribution(owners={}, processes_scanned=0, complete=True)
    owners: dict[int, ProcessRef] = {}
    locations: dict[int, tuple[int, str]] = {}
    if known is not None and known.locations:
        owners, locations = confirm_known_owners(paths, missing, known)
        missing.difference_update(owners)
    confirmed = len(owners)
    if not missing:
        return Attribution(owners, 0, complete=True, locations=locations, confirmed=confirmed)
    deadline = clock() + deadline_seconds
    scanned = vanished = denied = 0
    walked_all = True
    earlier = known.walked if known is not None else frozenset()
    counted = counts_fds(paths.root)
    size_class = (lambda pid: table_size_class(paths.pid(pid, "fd"))) if counted else None
    order = resume_order(_scan_order(paths, netns_inodes, uids, size_class), earlier)
    fresh = sum(1 for pid in order if pid not in earlier)  # the pids no cut walk has read yet
    attempted = 0
    targets = socket_links(missing)
    for pid in order:
        if clock() >= deadline:
            walked_all = False
            break
        attempted += 1
        try:
            found = wanted_sockets_in(paths.pid(pid, "fd"), targets, counted)
        except PermissionError:
            denied += 1
            continue
        except OSError:  # ENOENT, ESRCH: the process exited since the listing
            vanished += 1
            continue
        scanned += 1
        if not found:
            continue
        try:
            name = parse_comm(read_bytes(paths.pid(pid, "comm"), COMM_LIMIT))
        except OSError:
            vanished += 1
            continue
        owner = ProcessRef(pid=pid, name=name)
        for inode, fd in found:
            if inode in missing:  # the first sharer read keeps a socket shared across a fork
                owners[inode] = owner
                locations[inode] = (pid, fd)
        for inode, _ in found:
            missing.discard(inode)
            targets.pop(f"{SOCKET_PREFIX}{inode}]", None)
        if not missing:
            break
    if vanished or denied:
        _log.debug("fd scan skipped %d exited and %d denied processes", vanished, denied)
    # hidepid (systemd's ProtectProc=) hides other users' processes instead of denying them:
    # without CAP_SYS_PTRACE a walk that met no denial has still not seen every process.
    hidden = bool(missing) and procfs_hides_processes(paths)
    complete = not missing or (walked_all and denied == 0 and not hidden)
    walked: frozenset[int] = frozenset()
    if not walked_all:
        read_now = frozenset(order[:attempted])
        # Past every unread pid, this walk began a new round: only what it read is behind it.
        walked = read_now if attempted >= fresh else read_now | (earlier & frozenset(order))
        _log.debug("fd scan cut by its deadline after %d of %d processes", attempted, len(order))
    return Attribution(
        owners=owners,
        processes_scanned=scanned,
        complete=complete,
        processes_denied=denied,
        locations=locations,
        confirmed=confirmed,
        walked=walked,
    )


def wanted_inodes(table: SocketTable, lasting: frozenset[int] | None = None) -> frozenset[int]:
    """Inodes worth attributing: listeners, self-connected sockets and the chosen states
    (0 = no socket file, skip).

    With ``lasting`` (serve: the state inodes the previous poll saw), a socket in a chosen state
    is wanted once it was already there a poll ago. A CLOSE_WAIT its process closes a moment
    later is churn (S01 counts only the lasting ones); looking for its owner would walk every
    process' fds on each poll of a busy host, for a socket gone before anyone reads its name."""
    inodes = {listener.inode for listener in table.listeners}
    inodes.update(connected.inode for connected in table.self_connects)
    for state_inodes in table.inodes_by_state.values():
        inodes.update(state_inodes if lasting is None else state_inodes & lasting)
    inodes.update(stalled_inodes(table))
    inodes.discard(0)
    return frozenset(inodes)


STALLED_OWNERS = 32  # outbound connections per namespace whose owner a slowness rule names


def stalled_inodes(table: SocketTable) -> list[int]:
    """The worst live outbound connection of each destination whose connections wait on
    something (the peer's window, their send buffer, unread data here) or retransmit, at most
    :data:`STALLED_OWNERS`: who to name in rules W01-W04."""
    found: list[int] = []
    for use in table.ephemeral_use:
        stalls = use.stalls
        if stalls is None or not stalls.worst:
            continue
        if (
            stalls.zero_window
            or stalls.receive_queue_max_bytes
            or stalls.rwnd_limited_seconds
            or stalls.sndbuf_limited_seconds
            or stalls.segments_retransmitted
        ):
            found.append(stalls.worst[0].inode)
            if len(found) >= STALLED_OWNERS:
                break
    return found


def _attribution_on(settings: CollectSettings) -> bool:
    return settings.process_attribution


@host_source(
    "processes", field="attribution", order=50, needs=("sockdiag",), enabled=_attribution_on
)
def read_owners_source(context: SourceContext, snapshots: Sequence[Snapshot]) -> Attribution:
    """One /proc/*/fd walk serves every namespace: socket inodes are unique host-wide. It looks
    for ``context.owner_inodes`` when given (check: the owners its rules read), else for every
    candidate."""
    wanted: set[int] = set()
    uids: set[int] = set()
    seen: set[int] = set()
    known = context.known_owners
    for snapshot in snapshots:
        if snapshot.sockets is not None:
            if context.owner_inodes is None:
                wanted |= wanted_inodes(snapshot.sockets, None if known is None else known.seen)
            uids |= snapshot.sockets.owner_uids
            seen.update(*snapshot.sockets.inodes_by_state.values())
    if context.owner_inodes is not None:
        wanted = set(context.owner_inodes)  # only what the rules read (check)
    attribution = scan_owners(
        context.paths,
        frozenset(wanted),
        context.settings.process_scan_timeout,
        netns_inodes=frozenset(s.identity.inode for s in snapshots if s.identity.inode),
        known=known if known is not None else context.owner_hints,
        uids=frozenset(uids),
    )
    looked_for = context.owner_inodes  # None: every candidate (serve keeps no copy of them)
    return replace(attribution, seen=frozenset(seen), looked_for=looked_for)
