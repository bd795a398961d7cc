"""Which network namespace tcpwatch is looking at, and a stable name for it.

A network namespace is identified by the inode of its nsfs file; every handle on it has that
inode: ``/proc/PID/ns/net`` of each member process and each ``ip netns`` bind mount::

    /proc/self/ns/net -> net:[4026532247]
    /run/netns/blue        (nsfs bind mount, st_ino 4026532247)

Names, first match wins: ``host`` for the initial namespace, the ``ip netns`` name, then
``pid:<lowest member pid>`` (stable while that process lives, e.g. a container's init), and
``net:[INODE]`` when no handle we can read points at it.

The functions take an inode rather than reading "self", so the later discovery of every
namespace (entering each one with setns) can name the ones it enters with the same code.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from tcpwatch.paths import ProcPaths

# The initial namespace's fixed inode on recent kernels (uapi linux/nsfs.h NET_NS_INIT_INO; this
# 6.18 VM has it). Older kernels numbered it like any other namespace, from 0xF0000000 upwards, so
# this value can never name a different namespace.
NET_NS_INIT_INO = 0xEFFFFFF9
RUN_NETNS_DIR = "/run/netns"


def current_netns_inode(paths: ProcPaths) -> int:
    """Inode of the network namespace this process is in (``/proc/self/ns/net``)."""
    return os.stat(paths.pid("self", "ns", "net")).st_ino


def netns_name(paths: ProcPaths, inode: int, run_netns_dir: str = RUN_NETNS_DIR) -> str:
    """A name for the network namespace whose nsfs inode is ``inode``; handles we may not read
    are skipped.

    ``host`` is the initial namespace (by its fixed inode) or the one PID 1 of our procfs is in:
    on kernels before 6.18 that is the only clue, and in a container with its own PID namespace
    PID 1 is the container's init, whose namespace is then called ``host`` too.
    """
    if inode == NET_NS_INIT_INO or inode == _inode_of(paths.pid(1, "ns", "net")):
        return "host"
    named = ip_netns_name(inode, run_netns_dir)
    if named is not None:
        return named
    pid = lowest_member_pid(paths, inode)
    if pid is not None:
        return f"pid:{pid}"
    return f"net:[{inode}]"


def ip_netns_name(inode: int, run_netns_dir: str = RUN_NETNS_DIR) -> str | None:
    """The ``ip netns`` name bound to ``inode`` (alphabetically first if several are)."""
    try:
        names = sorted(os.listdir(run_netns_dir))
    except OSError:
        return None
    for name in names:
        if _inode_of(os.path.join(run_netns_dir, name)) == inode:
            return name
    return None


def lowest_member_pid(paths: ProcPaths, inode: int) -> int | None:
    """The lowest pid whose ``/proc/PID/ns/net`` is ``inode``."""
    for pid in sorted(paths.list_pids()):
        if _inode_of(paths.pid(pid, "ns", "net")) == inode:
            return pid
    return None


def _inode_of(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:  # gone, or not ours to read (PID 1 of a more privileged sandbox)
        return None


# --- discovery of every namespace on the host, and entering one -------------------------------

# Container ids in cgroup paths, as Docker, containerd (CRI), CRI-O and Podman write them:
# .../docker-<id>.scope, /docker/<id>, .../cri-containerd-<id>.scope, .../crio-<id>.scope,
# .../libpod-<id>.scope, /kubepods/<qos>/pod<uid>/<id>.
_CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)", re.MULTILINE)
# Pod UID: kubepods-besteffort-pod<uid with _>.slice (systemd driver) or /pod<uid>/ (cgroupfs).
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
SERVICE_ACCOUNT_NAMESPACE = "var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True, slots=True)
class NetnsTarget:
    """A network namespace to poll: how to enter it and what to call it."""

    name: str
    inode: int
    path: str | None  # nsfs file to setns() into; None for the namespace we already are in
    container: str = ""  # container id (12 hex digits) of a member process, if any
    pod: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""


def discover(paths: ProcPaths, run_netns_dir: str = RUN_NETNS_DIR) -> tuple[NetnsTarget, ...]:
    """Every network namespace with a handle: ``ip netns`` names and member processes.

    One entry per distinct nsfs inode, ours first, the rest by name. Handles we may not read
    (other users' processes without CAP_SYS_PTRACE) are skipped.
    """
    own = current_netns_inode(paths)
    handles: dict[int, str] = {}
    names: dict[int, str] = {}
    try:
        entries = sorted(os.listdir(run_netns_dir))
    except OSError:
        entries = []
    for entry in entries:
        path = os.path.join(run_netns_dir, entry)
        inode = _inode_of(path)
        if inode is not None and inode not in names:
            names[inode] = entry
            handles[inode] = path
    members: dict[int, list[int]] = {}
    for pid in sorted(paths.list_pids()):
        path = paths.pid(pid, "ns", "net")
        inode = _inode_of(path)
        if inode is None:
            continue
        members.setdefault(inode, []).append(pid)
        handles.setdefault(inode, path)
    targets: list[NetnsTarget] = []
    for inode in {own, *handles}:
        pids = members.get(inode, [])
        identity = _container_identity(paths, pids)
        if inode == own:
            name = netns_name(paths, inode, run_netns_dir)
        elif inode == NET_NS_INIT_INO:
            name = "host"
        elif inode in names:
            name = names[inode]
        elif identity.pod and identity.pod_namespace:
            name = f"pod:{identity.pod_namespace}/{identity.pod}"
        elif identity.container:
            name = f"container:{identity.container}"
        elif pids:
            name = f"pid:{pids[0]}"
        else:
            name = f"net:[{inode}]"
        targets.append(
            NetnsTarget(
                name=name,
                inode=inode,
                path=None if inode == own else handles[inode],
                container=identity.container,
                pod=identity.pod,
                pod_namespace=identity.pod_namespace,
                pod_uid=identity.pod_uid,
            )
        )
    targets.sort(key=lambda t: (t.path is not None, t.name != "host", t.name))
    return tuple(_unique_names(targets))


def _unique_names(targets: list[NetnsTarget]) -> list[NetnsTarget]:
    """Two namespaces must never share a name (e.g. two netns of one pod's containers)."""
    seen: dict[str, int] = {}
    unique: list[NetnsTarget] = []
    for target in targets:
        count = seen.get(target.name, 0)
        seen[target.name] = count + 1
        if count:
            target = replace(target, name=f"{target.name}#{target.inode}")
        unique.append(target)
    return unique


@dataclass(frozen=True, slots=True)
class _Identity:
    container: str = ""
    pod: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""


def _container_identity(paths: ProcPaths, pids: list[int]) -> _Identity:
    """Container id and pod of the first member process whose cgroup names one (best effort).

    The pod UID is in the cgroup path; its name and namespace are not, so they come from a
    member's /etc/hostname and mounted service-account namespace file, read through
    /proc/PID/root (needs CAP_SYS_PTRACE for other users' processes).
    """
    for pid in pids[:16]:
        try:
            with open(paths.pid(pid, "cgroup"), encoding="utf-8", errors="replace") as handle:
                cgroup = handle.read()
        except OSError:
            continue
        container = _CONTAINER_ID.search(cgroup)
        if container is None:
            continue
        pod_uid = _POD_UID.search(cgroup)
        identity = _Identity(container=container.group(1)[:12])
        if pod_uid is None:
            return identity
        pod_namespace = ""
        pod = ""
        for member in pids[:16]:
            pod_namespace = pod_namespace or _read_first_line(
                paths.pid(member, "root", SERVICE_ACCOUNT_NAMESPACE)
            )
            pod = pod or _read_first_line(paths.pid(member, "root", "etc", "hostname"))
            if pod and pod_namespace:
                break
        return replace(
            identity,
            pod=pod,
            pod_namespace=pod_namespace,
            pod_uid=pod_uid.group(1).replace("_", "-"),
        )
    return _Identity()


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline(256).strip()
    except OSError:
        return ""


def select(targets: tuple[NetnsTarget, ...], selection: tuple[str, ...]) -> tuple[NetnsTarget, ...]:
    """Apply the `namespaces:` setting: ("self",), ("all",) or name patterns (fnmatch)."""
    if selection == ("self",):
        return tuple(t for t in targets if t.path is None)
    if selection == ("all",):
        return targets
    return tuple(
        t
        for t in targets
        if any(
            fnmatch.fnmatchcase(t.name, pattern) or (pattern == "self" and t.path is None)
            for pattern in selection
        )
    )


T = TypeVar("T")


class NetnsGone(Exception):
    """The namespace vanished between discovery and entering it."""


def run_inside(target: NetnsTarget, work: Callable[[], T], timeout: float = 60.0) -> T:
    """Run ``work`` with this thread's network namespace switched to ``target``.

    setns() changes only the calling thread, so the work runs in a fresh thread that enters the
    namespace and ends afterwards; the rest of the process never leaves its own namespace. Sockets
    opened there stay bound to that namespace, and /proc/thread-self/net and /proc/sys/net show it.
    """
    if target.path is None:
        return work()
    try:
        descriptor = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as error:
        raise NetnsGone(f"{target.name}: {error.strerror}") from None
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_work() -> None:
        try:
            _setns(descriptor)
            outcome.append(work())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    try:
        thread = threading.Thread(target=enter_and_work, name=f"netns-{target.name}", daemon=True)
        thread.start()
        thread.join(timeout)
    finally:
        os.close(descriptor)
    if thread.is_alive():
        raise TimeoutError(f"polling namespace {target.name} took over {timeout:g} s")
    if failure:
        raise failure[0]
    return outcome[0]


def _setns(descriptor: int) -> None:
    from pyroute2 import netns as pyroute2_netns

    try:
        # flags=0: never create anything; an fd argument is used as it is.
        pyroute2_netns.setns(descriptor, flags=0)
    except OSError as error:
        if error.errno == errno.EPERM:
            raise PermissionError(
                "entering another network namespace needs CAP_SYS_ADMIN"
            ) from None
        raise
