"""/proc/sys (and /proc/net) files kept open between polls and read again with pread(fd, 0).

Opening, reading and closing two dozen /proc/sys files is most of what the sysctl source costs a
quiet poll (~8 us a file, the path walk and the open); a pread on a descriptor kept open is ~1 us
and reads the same thing: the kernel renders a sysctl afresh on every read (proc_sys_read calls
the table's handler), so a held descriptor never shows a stale value.

Which namespace a held descriptor reads: the one it was opened in. /proc/sys/net resolves the
calling thread's namespace at open time, and the open file keeps that namespace's table header
(fs/proc/proc_sysctl.c, ``grab_header`` on every read). When the namespace goes away its headers
are unregistered and every read of a descriptor opened in it fails with ENOENT
(``sysctl_head_grab``: ``unregistering`` is set and never cleared), never an old value. So the
descriptors are kept per namespace inode, and a read that fails for any reason closes the
descriptor and the file is opened afresh by the calling thread (which is in the namespace being
polled, so an inode number reused by a new namespace reads the new one).

Only descriptors of generated files are held: a file that reports size 0 and read some text (a
procfs or sysfs file). A regular file in a fixture tree (``--path.procfs``) is read with an open
every time, so one replaced by a rename is never read through its old inode. At most
``MAX_HELD`` descriptors are held (the shipped unit allows 65,536, a shell's default 1,024), so a
host with hundreds of namespaces opens the files of the ones beyond it as before.

procnet.py holds the /proc/net tables (snmp, netstat, sockstat, sockstat6) here as well, under
the same key. Unlike a /proc/sys file, an open /proc/net file holds its namespace alive
(``single_open_net`` takes a reference until release), so ``end_poll`` closing a namespace's
descriptors as soon as a poll passes it by is what lets a deleted namespace go.

Owned by the pipeline's FileMemo (one per SnapshotTaker), never by a module; ``end_poll`` closes
the descriptors of namespaces not polled since the last call, ``close`` all of them.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Hashable

from tcpwatch.paths import read_to_end

MAX_HELD = 512


class HeldFiles:
    """``read(key, path, limit)``: the text of ``path``, from a descriptor held under ``key``
    (a namespace's inode) when it is a generated file. Raises OSError (FileNotFoundError when
    absent) and UnicodeDecodeError as :func:`tcpwatch.paths.read_small_text` does."""

    def __init__(self, max_held: int = MAX_HELD) -> None:
        self._max_held = max_held
        self._fds: dict[Hashable, dict[str, int]] = {}
        self._touched: set[Hashable] = set()
        self._lock = threading.Lock()  # namespaces are polled from threads of their own
        self.opens = 0  # files opened, not read from a held descriptor (tests, benchmarks)

    @property
    def held(self) -> int:
        return sum(len(fds) for fds in list(self._fds.values()))

    def read(self, key: Hashable, path: str, limit: int, encoding: str = "ascii") -> str:
        self._touched.add(key)
        fds = self._fds.get(key)
        fd = fds.get(path) if fds is not None else None
        if fd is not None and fds is not None:
            try:
                # One pread is the whole text up to ``limit``: a sysctl read renders the value
                # into the caller's buffer in one go (proc_sys_call_handler), so the read to
                # the end a first open does would only add a second call that returns nothing.
                return os.pread(fd, limit, 0).decode(encoding)
            except OSError:
                # The namespace went away (ENOENT) or the file cannot be read: never trust the
                # descriptor again; the file is opened afresh below, as on a first poll.
                del fds[path]
                os.close(fd)
        return self._open_and_read(key, path, limit).decode(encoding)

    def _open_and_read(self, key: Hashable, path: str, limit: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.opens += 1
        keep = False
        try:
            data = read_to_end(fd, limit)
            if data and self.held < self._max_held:
                info = os.fstat(fd)
                keep = stat.S_ISREG(info.st_mode) and info.st_size == 0
            if keep:
                with self._lock:
                    old = self._fds.setdefault(key, {}).pop(path, None)
                    self._fds[key][path] = fd
                if old is not None:
                    os.close(old)
            return data
        finally:
            if not keep:
                os.close(fd)

    def end_poll(self) -> None:
        """Close the descriptors of keys no read asked for since the last call."""
        with self._lock:
            gone = [key for key in self._fds if key not in self._touched]
            dropped = [self._fds.pop(key) for key in gone]
            self._touched = set()
        for fds in dropped:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            dropped = list(self._fds.values())
            self._fds = {}
        for fds in dropped:
            for fd in fds.values():
                os.close(fd)
