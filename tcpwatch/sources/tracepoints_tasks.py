"""Which network namespace and process a task is: perf's side-band records, /proc as a fallback.

A tracepoint record names the task that was running (``common_pid``, a thread id). When it was
written outside interrupt context, that task is the one acting on the socket (it called
``connect()``, ``listen()`` or ``close()``), so its namespace is the socket's and its process is
the socket's user. Tasks are followed with perf's side-band records, read in time order with the
samples: a fork (PERF_RECORD_FORK) inherits its parent's process name, and is followed by the
child's namespaces (PERF_RECORD_NAMESPACES, also written at setns() and unshare()); an exec or a
rename brings the new name (PERF_RECORD_COMM); an exit ends the task (PERF_RECORD_EXIT). So a
short-lived client that connects and exits at once is still attributed. A task older than the
reader is looked up once in ``/proc/PID/task/TID/ns/net`` and ``/proc/PID/comm`` (the name
process attribution and ``ss -p`` show); one that exited before that cannot be resolved, and the
caller counts its record as unattributed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from tcpwatch.paths import ProcPaths, read_text

TASK_LIMIT = 65536  # tasks remembered; past it the memory starts afresh (one /proc read each)
_COMM_BYTES = 64


class TaskResolver:
    """tid -> (namespace inode, process name). Not thread-safe: one reader thread uses it."""

    def __init__(self, paths: ProcPaths | None = None, limit: int = TASK_LIMIT) -> None:
        self._paths = paths or ProcPaths()
        self._limit = limit
        self._netns: dict[int, int] = {}  # tid -> nsfs inode
        self._names: dict[int, str] = {}  # pid -> comm
        self.lookups = 0  # /proc reads made, a measure of the cost
        self.gone = 0  # tasks that had exited when asked about

    def known(self) -> tuple[Mapping[int, int], Mapping[int, str]]:
        """The tables :meth:`resolve` reads first (tid -> inode, pid -> name), for a hot
        caller's inline hit path: a miss in either must go through :meth:`resolve`."""
        return self._netns, self._names

    def resolve(self, pid: int, tid: int) -> tuple[int, str] | None:
        """(netns inode, process name) of thread ``tid`` of process ``pid``; None when gone."""
        inode = self._netns.get(tid)
        name = self._names.get(pid)
        if inode is not None and name is not None:
            return inode, name
        if len(self._netns) >= self._limit or len(self._names) >= self._limit:
            self._netns.clear()
            self._names.clear()
        self.lookups += 1
        try:
            if inode is None:
                inode = os.stat(self._paths.pid(pid, "task", str(tid), "ns", "net")).st_ino
            if name is None:
                with open(self._paths.pid(pid, "comm"), "rb") as file:
                    raw = file.read(_COMM_BYTES)
                name = raw.rstrip(b"\n").decode("utf-8", "replace")
        except OSError:  # exited (or, without CAP_SYS_PTRACE, another user's task)
            self.gone += 1
            return None
        self._netns[tid] = inode
        self._names[pid] = name
        return inode, name

    def forked(self, pid: int, ppid: int, tid: int, ptid: int) -> None:
        """A new task: a new process keeps its parent's name until it execs; the namespaces
        record that follows gives its namespace (until then, its parent thread's)."""
        inode = self._netns.get(ptid)
        if inode is not None:
            self._netns[tid] = inode
        if pid not in self._names:
            name = self._names.get(ppid)
            if name is not None:
                self._names[pid] = name

    def named(self, pid: int, tid: int, name: str) -> None:
        """An exec or a rename; a thread's own name is not its process' name."""
        if pid == tid:
            self._names[pid] = name

    def entered(self, tid: int, inode: int) -> None:
        """The thread's namespace, at its birth or after setns() or unshare()."""
        self._netns[tid] = inode

    def exited(self, pid: int, tid: int) -> None:
        self._netns.pop(tid, None)
        if pid == tid:
            self._names.pop(pid, None)

    def __len__(self) -> int:
        return len(self._netns)


def local_addresses(fib_trie: str, if_inet6: str) -> frozenset[bytes]:
    """The addresses of a namespace (16 bytes each, IPv4 zero-padded): the ``/32 host LOCAL``
    entries of /proc/net/fib_trie and the addresses of /proc/net/if_inet6, loopback and IPv6
    link-local ones left out (every namespace has those, or may)."""
    found: set[bytes] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text.startswith("/32 host LOCAL") and last and not last.startswith("127."):
            try:
                found.add(socket.inet_pton(socket.AF_INET, last) + bytes(12))
            except OSError:
                continue
    for line in if_inet6.splitlines():
        word = line.split(" ", 1)[0]
        if len(word) == 32 and word != "0" * 31 + "1" and not word.startswith("fe8"):
            try:
                found.add(bytes.fromhex(word))
            except ValueError:
                continue
    return frozenset(found)


def own_addresses(paths: ProcPaths) -> frozenset[bytes]:
    """The addresses of the namespace tcpwatch runs in (empty when /proc/net does not say)."""
    try:
        return local_addresses(read_text(paths.net("fib_trie")), read_text(paths.net("if_inet6")))
    except (OSError, UnicodeDecodeError):
        return frozenset()
