"""Where procfs lives: the only module that builds /proc paths, so tests can use fixtures."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcPaths:
    """A procfs root (``--path.procfs``); ``/proc`` on a live host, a fixture tree in tests.

    ``net_dir`` names the per-namespace network directory below the root: ``net`` follows the
    reading process' namespace; ``thread-self/net`` follows the reading thread's after setns().
    """

    root: str = "/proc"
    net_dir: str = "net"

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
