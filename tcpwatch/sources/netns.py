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

import os

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
