"""Reading one process' fd table for wanted sockets, and the order processes are read in.

A wanted socket's owner is found by reading fd links (``/proc/PID/fd/N -> socket:[INODE]``)
until it turns up. On the live procfs the kernel's readlink is ~2.9 us a link on a VM and
listing the directory another ~0.5-0.75 us an entry (docs/performance.md), so the two choices
here are what is read and in which order, never whether a socket held throughout is seen:

* **No listing of a dense table.** Since Linux 6.2 the size stat() reports for
  /proc/PID/fd is the number of open fds (fs/proc/fd.c, proc_fd_getattr). With ``n`` of them the
  names 0..n-1 are read directly (a hole costs a failed lookup), and the directory is then
  listed from position n on only (procfs fd directories place fd N at offset N+2, so an lseek
  skips the part already read; usually nothing is left). Every fd open throughout the read is
  read once: those below the switch by name, the others by the listing made after. After
  :data:`MAX_HOLES` holes the names are left and the rest of the table is listed, so a sparse
  table costs at most that many failed lookups more than a listing.
* **Small tables first.** Among processes equally likely to hold the sockets (same namespace,
  the sockets' users), those with the smaller tables are read first, by size class (a factor of
  two), pid order within a class: the walk stops when every wanted socket is found, so a small
  server holding them is read before a process holding 100,000 other sockets.

Neither changes what is found: a socket is named under a process only when its link is read
there. Which co-holder of a shared socket is named can change with the order (see
``scan_owners``); every one named holds it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

SOCKET_PREFIX = "socket:["
MAX_HOLES = 32  # failed lookups of fd names before the rest of a table is listed instead
LIVE_PROCFS = "/proc"  # where fd directories report their fd count (Linux >= 6.2)


def socket_links(inodes: Iterable[int]) -> dict[str, int]:
    """The fd link text of each socket inode (``socket:[48213]`` -> 48213): what the walk
    compares each link with, so a link is matched whole, without parsing it."""
    return {f"{SOCKET_PREFIX}{inode}]": inode for inode in inodes}


def counts_fds(root: str) -> bool:
    """True when fd directories under ``root`` are the live procfs', whose size is their fd
    count and whose offsets are fd numbers (a fixture tree's are neither)."""
    return os.path.realpath(root) == LIVE_PROCFS


def wanted_sockets_in(
    fd_dir: str, targets: Mapping[str, int], counted: bool = False
) -> list[tuple[int, str]]:
    """(inode, fd name) of the sockets of ``targets`` (see :func:`socket_links`) open in one fd
    directory; ``counted``: it is a live procfs fd directory (:func:`counts_fds`), read by name
    while its table is dense.

    Raises OSError when the directory or its links cannot be read (PermissionError: access is
    denied; others: the process exited). An fd closed between the listing and its readlink is
    skipped. Stops once every target is found (two fds of one socket count once).

    This runs once per open descriptor of every process read (~120,000-140,000 at 131k
    sockets): each link is read relative to the open directory and looked up whole in
    ``targets``; what is left is the kernel's readlink (docs/performance.md).
    """
    found: list[tuple[int, str]] = []
    seen: set[int] = set()
    wanted = len(targets)
    readlink = os.readlink
    # Links are read relative to the open directory: it stays bound to this process, so once the
    # process exits they fail instead of reading whatever process reuses the pid.
    dir_fd = os.open(fd_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        start = 0
        if counted:
            holes = 0
            for number in range(os.fstat(dir_fd).st_size):
                name = str(number)
                start = number + 1
                try:
                    link = readlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    holes += 1
                    if holes > MAX_HOLES:
                        break  # sparse: list the rest instead
                    continue
                except PermissionError:
                    raise  # the listing can be allowed while the links are not (ptrace check)
                except OSError:
                    continue
                inode = targets.get(link)
                if inode is not None:
                    found.append((inode, name))
                    seen.add(inode)
                    if len(seen) == wanted:
                        return found  # every wanted socket is here: the rest can wait
            os.lseek(dir_fd, start + 2, os.SEEK_SET)  # fd N is at offset N + 2 (after . and ..)
        for name in os.listdir(dir_fd):
            if start and int(name) < start:
                continue  # read by name above (os.listdir kept the offset: nothing to skip)
            try:
                link = readlink(name, dir_fd=dir_fd)
            except PermissionError:
                raise
            except OSError:
                continue
            inode = targets.get(link)
            if inode is not None:
                found.append((inode, name))
                seen.add(inode)
                if len(seen) == wanted:
                    break
    finally:
        os.close(dir_fd)
    return found


def table_size_class(paths_pid_fd: str) -> int:
    """The size class of one live procfs fd table (its fd count's bit length: a factor of two
    a class); 0 when it cannot be stat'ed or the kernel does not count (before 6.2)."""
    try:
        return os.stat(paths_pid_fd).st_size.bit_length()
    except OSError:
        return 0


def ranked(
    pids: Iterable[int], rank: Callable[[int], int], size_class: Callable[[int], int] | None
) -> list[int]:
    """``pids`` by (rank, size class, pid): the likeliest holders first, then the smaller
    tables, then the lower pids (a socket shared across a fork is then usually named under its
    parent, which ``ss -p`` lists last)."""
    if size_class is None:
        return sorted(pids, key=lambda pid: (rank(pid), pid))
    return sorted(pids, key=lambda pid: (rank(pid), size_class(pid), pid))
