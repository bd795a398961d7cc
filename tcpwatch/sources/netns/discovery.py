"""Every network namespace on the host that has a handle, and the `namespaces:` selection."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, replace

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.netns.naming import (
    NET_NS_INIT_INO,
    RUN_NETNS_DIR,
    Identity,
    choose_name,
    container_identity,
    current_netns_inode,
    inode_of,
)


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

    One entry per distinct nsfs inode, ours first, then ``host``, the rest by name. Handles we
    may not read (other users' processes without CAP_SYS_PTRACE) are skipped. Names as
    :func:`~tcpwatch.sources.netns.naming.choose_name` gives them, made unique.
    """
    own = current_netns_inode(paths)
    host = inode_of(paths.pid(1, "ns", "net"))
    handles: dict[int, str] = {}
    names: dict[int, str] = {}
    try:
        entries = sorted(os.listdir(run_netns_dir))
    except OSError:
        entries = []
    for entry in entries:
        path = os.path.join(run_netns_dir, entry)
        inode = inode_of(path)
        if inode is not None and inode not in names:
            names[inode] = entry
            handles[inode] = path
    members: dict[int, list[int]] = {}
    for pid in sorted(paths.list_pids()):
        path = paths.pid(pid, "ns", "net")
        inode = inode_of(path)
        if inode is None:
            continue
        members.setdefault(inode, []).append(pid)
        handles.setdefault(inode, path)
    targets: list[NetnsTarget] = []
    for inode in {own, *handles}:
        pids = members.get(inode, [])
        is_host = inode in (NET_NS_INIT_INO, host)
        # The host's processes include hostNetwork pods and runtimes' helpers (conmon): their
        # cgroups say nothing about the namespace.
        identity = Identity() if is_host else container_identity(paths, pids)
        targets.append(
            NetnsTarget(
                name=choose_name(inode, is_host, names.get(inode), identity),
                inode=inode,
                path=None if inode == own else handles[inode],
                container=identity.container,
                pod=identity.pod,
                pod_namespace=identity.pod_namespace,
                pod_uid=identity.pod_uid,
            )
        )
    # The inode breaks ties, so which of two same-named namespaces gets the suffix never flips.
    targets.sort(key=lambda t: (t.path is not None, t.name != "host", t.name, t.inode))
    return tuple(_unique_names(targets))


def _unique_names(targets: list[NetnsTarget]) -> list[NetnsTarget]:
    """Two namespaces must never share a name (e.g. a pod's old and new sandbox)."""
    seen: dict[str, int] = {}
    unique: list[NetnsTarget] = []
    for target in targets:
        count = seen.get(target.name, 0)
        seen[target.name] = count + 1
        if count:
            target = replace(target, name=f"{target.name}#{target.inode}")
        unique.append(target)
    return unique


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
