"""Where procfs and the host's root live, and how procfs is read.

The only module that builds /proc paths (so tests can use fixture trees), the one way sources
read a procfs file, and the one check that a directory is a procfs mount at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tcpwatch.validation import shown_path

# Where persisted sysctl settings live, below the host's root (``--path.rootfs``), as
# ``sysctl --system`` and systemd-sysctl read them. Highest priority first: a file name found in
# an earlier directory masks the later ones; the main file is applied last.
SYSCTL_DROP_IN_DIRECTORIES: tuple[str, ...] = (
    "etc/sysctl.d",
    "run/sysctl.d",
    "usr/local/lib/sysctl.d",
    "usr/lib/sysctl.d",
    "lib/sysctl.d",
)
SYSCTL_MAIN_FILE = "etc/sysctl.conf"


@dataclass(frozen=True, slots=True)
class ProcPaths:
    """A procfs root (``--path.procfs``); ``/proc`` on a live host, a fixture tree in tests.

    ``net_dir`` names the per-namespace network directory below the root: ``net`` follows the
    reading process' namespace; ``thread-self/net`` follows the reading thread's after setns().
    ``rootfs`` is the host's root filesystem (``--path.rootfs``): "/" on a live host, the
    node's / mounted into a container; host-wide sources read the host's /etc below it.
    """

    root: str = "/proc"
    net_dir: str = "net"
    rootfs: str = "/"

    def net(self, name: str) -> str:
        """/proc/net/<name>, e.g. ``netstat``, ``snmp``, ``sockstat6``."""
        return os.path.join(self.root, self.net_dir, name)

    def sysctl(self, dotted: str) -> str:
        """/proc/sys path of a dotted sysctl name (``net.core.somaxconn``)."""
        return os.path.join(self.root, "sys", *dotted.split("."))

    def pid(self, pid: int | str, *parts: str) -> str:
        """/proc/<pid>/<parts...>."""
        return os.path.join(self.root, str(pid), *parts)

    def list_pids(self) -> list[int]:
        """Numeric entries of the root: the processes visible to us."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return [int(name) for name in names if name.isdigit()]


def read_text(path: str, limit: int = -1, encoding: str = "ascii", errors: str = "strict") -> str:
    """The text of a procfs file, read in one go (the kernel renders it per read).

    ``limit`` bounds the characters read from files a process or a container controls the size
    of; kernel tables such as /proc/net/netstat are read whole. The default encoding is strict
    ASCII, which every kernel-rendered table is: anything else is a parse error, not a guess.
    Raises OSError (FileNotFoundError when absent) with the path.
    """
    with open(path, encoding=encoding, errors=errors) as file:
        return file.read(limit)


def read_small_text(path: str, limit: int, encoding: str = "ascii") -> str:
    """:func:`read_text` for files of a line or two (a /proc/sys value), read at most ``limit``
    bytes: os.read on a bare descriptor, a third of what a text file object costs to open, read
    and close (~5 against ~15 us; a poll reads two dozen sysctls in every namespace).
    Raises OSError (FileNotFoundError when absent), UnicodeDecodeError as read_text does."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_to_end(fd, limit).decode(encoding)
    finally:
        os.close(fd)


def read_to_end(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes of an open descriptor, read from where it stands to the end."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bytes(path: str, limit: int = -1) -> bytes:
    """The raw bytes of a procfs file, at most ``limit`` (``comm`` is whatever the task set)."""
    with open(path, "rb") as file:
        return file.read(limit)


def procfs_problem(root: str) -> str | None:
    """Why ``root`` is not a usable procfs mount, or None when it looks like one."""
    if os.path.isfile(os.path.join(root, "net", "sockstat")):
        return None
    return f"{shown_path(root)} does not look like a procfs mount (no net/sockstat)"
