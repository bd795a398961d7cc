"""A throw-away network namespace for the benchmark, and ways to work inside it.

The benchmark process itself stays in the host's namespace. For a moment it enters the
benchmark's namespace with setns() (its only thread, so nothing else is affected) to start a
child process there (children keep the namespace they were forked in), to open a socket there
(a socket keeps the namespace it was created in), or to read and write that namespace's
/proc/sys/net and /proc/net files; then it returns. Unlike ``ip netns exec``, this adds no
process and no mount namespace to the children whose CPU time is measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
RUN_NETNS = "/run/netns"


class NamespaceError(Exception):
    """The namespace could not be made, entered or removed."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise NamespaceError(f"setns: {os.strerror(code)}")


def die_with_parent() -> None:
    """For preexec_fn: the child is killed when the benchmark dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def current_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str

    @property
    def path(self) -> str:
        return os.path.join(RUN_NETNS, self.name)

    @classmethod
    def create(cls, prefix: str = "tw-bench") -> Namespace:
        namespace = cls(f"{prefix}-{secrets.token_hex(4)}")
        _run(["ip", "netns", "add", namespace.name])
        try:
            _run(["ip", "-n", namespace.name, "link", "set", "lo", "up"])
        except NamespaceError:
            namespace.delete()
            raise
        return namespace

    def inode(self) -> int:
        return os.stat(self.path).st_ino

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body inside the namespace; the host's namespace is restored even on errors."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                if current_netns_inode() != self.inode():
                    raise NamespaceError(f"setns did not move us into {self.name}")
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def spawn(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start a child inside the namespace; it dies with the benchmark."""
        with self.entered():
            return subprocess.Popen(list(argv), preexec_fn=die_with_parent, **popen)

    def read_file(self, path: str) -> str:
        """A /proc/sys/net or /proc/thread-self/net file as this namespace shows it."""
        with self.entered(), open(path, encoding="ascii") as handle:
            return handle.read()

    def read_net(self, name: str) -> str:
        return self.read_file(f"/proc/thread-self/net/{name}")

    def read_sysctl(self, dotted: str) -> str:
        return self.read_file("/proc/sys/" + dotted.replace(".", "/")).strip()

    def write_sysctl(self, dotted: str, value: str) -> None:
        """Set a per-namespace sysctl of this namespace, never the host's."""
        path = "/proc/sys/" + dotted.replace(".", "/")
        with self.entered():
            if current_netns_inode() != self.inode():  # belt and braces: never the host's
                raise NamespaceError(f"refusing to write {dotted} outside {self.name}")
            with open(path, "w", encoding="ascii") as handle:
                handle.write(value)

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        with self.entered():
            return socket.create_connection(address, timeout=timeout)

    def delete(self) -> None:
        """Remove the namespace; its sockets go when its last process is gone."""
        _run(["ip", "netns", "del", self.name])


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespaceError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
