"""Values read from files that rarely change, reused by later polls while the files are the same.

/etc/sysctl.d and friends change when an operator or a package edits them, not between two polls,
yet parsing them (listing five directories, following symlinks below ``--path.rootfs``, reading
and parsing each file) is a fifth of a quiet poll. A :class:`FileMemo` keeps each value with the
``stat()`` of every path it was read from (device, inode, size, mtime and ctime in ns, of the path
and of the link itself): a poll that finds every one unchanged reuses the value, at the cost of a
couple of dozen stats. A file rewritten in place changes its mtime and ctime, one replaced by a
rename or a re-pointed symlink changes its inode and its directory's times, a new drop-in changes
its directory's. What stat cannot show, a write within a tick of the kernel's coarse file clock
of the read (before it, during it, or one of the same size just after it), is handled as git
handles "racily clean" files: a value whose files' ctime is within ``RACY_NS`` of the read is
not reused but read again next poll. And whatever stat says, a value is read afresh once it is
``max_age`` seconds old.

Not for /proc/sys or /proc/net: procfs gives its files no modification time a value change would
touch, so those are read on every poll; :meth:`FileMemo.parsed` spares only parsing a text equal
to the last one, and ``held`` (heldfiles.py) the opening of a /proc/sys file read every poll.

The memo belongs to whoever polls (the pipeline's SnapshotTaker), never to a module.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from tcpwatch.sources.heldfiles import HeldFiles
from tcpwatch.sources.owner_memo import KnownOwners

_T = TypeVar("_T")
_R = TypeVar("_R")  # what was read: a file's text, or a tuple of texts
MAX_AGE_SECONDS = 60.0  # a value is read afresh at least this often, whatever stat says
RACY_NS = 2_000_000_000  # a ctime this close to the read may hide a write the stat cannot show

Stamp = tuple[int, int, int, int, int] | str


def _stamp(path: str, follow: bool) -> Stamp:
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as error:
        return type(error).__name__  # absent or unreadable: as much a state as a file
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamps(path: str) -> tuple[Stamp, Stamp]:
    """The path's stat, following links, and its own lstat: one call when it is not a link,
    whose stat is its lstat."""
    try:
        st = os.lstat(path)
    except OSError:
        return _stamp(path, True), _stamp(path, False)
    own = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if stat.S_ISLNK(st.st_mode):
        return _stamp(path, True), own
    return own, own


def fingerprint(paths: Sequence[str]) -> tuple[Stamp, ...]:
    """Each path's stat, following links, and its own lstat (a re-pointed link is a new one)."""
    return tuple(stamp for path in paths for stamp in _stamps(path))


@dataclass(frozen=True, slots=True)
class _Kept:
    paths: tuple[str, ...]
    fingerprint: tuple[Stamp, ...]
    value: object
    read_at: float


class FileMemo:
    """``reuse(key, read)``: ``read()`` returns the value and the paths it came from (files and
    the directories listed); the value is returned again while those paths stat the same."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_age: float = MAX_AGE_SECONDS,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._clock = clock
        self._wall_ns = wall_ns
        self._max_age = max_age
        self._kept: dict[Hashable, _Kept] = {}
        self.reads = 0  # how many times a value was read, not reused (tests, benchmarks)
        self._texts: dict[Hashable, tuple[object, object]] = {}
        self._touched: set[Hashable] = set()
        self.parses = 0  # texts parsed, not reused
        self.held = HeldFiles()  # /proc/sys descriptors kept open, per namespace
        self.owners = KnownOwners()  # what cannot change of each described owner, by pid

    def reuse(self, key: Hashable, read: Callable[[], tuple[_T, Sequence[str]]]) -> _T:
        now = self._clock()
        kept = self._kept.get(key)
        if (
            kept is not None
            and now - kept.read_at < self._max_age
            and fingerprint(kept.paths) == kept.fingerprint
        ):
            return cast(_T, kept.value)
        started_ns = self._wall_ns()
        value, paths = read()
        paths = tuple(paths)
        stamps = fingerprint(paths)
        self.reads += 1
        if any(isinstance(s, tuple) and s[4] >= started_ns - RACY_NS for s in stamps):
            self._kept.pop(key, None)  # changed about when it was read: not trusted, read again
        else:
            self._kept[key] = _Kept(paths, stamps, value, now)
        return value

    def parsed(self, key: Hashable, text: _R, parse: Callable[[_R], _T]) -> _T:
        """``parse(text)``, or what it gave for the same text under ``key`` last time: a
        procfs table read every poll (/proc/net/snmp, netstat) is most often the same text in
        a quiet namespace, and comparing it is far cheaper than parsing it. ``parse`` must be
        pure and its value not mutated by the caller."""
        self._touched.add(key)
        kept = self._texts.get(key)
        if kept is not None and kept[0] == text:
            return cast(_T, kept[1])
        value = parse(text)
        self._texts[key] = (text, value)
        self.parses += 1
        return value

    def end_poll(self) -> None:
        """Forget the texts no source asked for since the last call (a namespace gone)."""
        self._texts = {key: kept for key, kept in self._texts.items() if key in self._touched}
        self._touched = set()
        self.held.end_poll()

    def close(self) -> None:
        """Close the held descriptors (the memo's owner stops polling)."""
        self.held.close()
        self.owners.close()
