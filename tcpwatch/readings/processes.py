"""What the processes source read: socket inode -> owning process, from one walk of
/proc/*/fd (the snapshot's ``attribution``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    name: str


@dataclass(frozen=True, slots=True)
class Attribution:
    """Socket inode -> owning process, from one scan of /proc/*/fd."""

    owners: Mapping[int, ProcessRef]
    processes_scanned: int
    complete: bool  # every wanted inode was found or every process was scanned
    processes_denied: int = 0  # processes whose fds we may not read (no CAP_SYS_PTRACE...)
    # Where each owner holds the socket (inode -> (pid, fd name)): the next scan re-checks these
    # with one readlink each instead of walking every process' fd table again.
    locations: Mapping[int, tuple[int, str]] = field(default_factory=dict)
    confirmed: int = 0  # owners found again at their known location, without a walk
    seen: frozenset[int] = frozenset()  # attributed-state inodes seen: the next poll's candidates
    walked: frozenset[int] = frozenset()  # pids a cut walk read: the next walk reads the rest first
    # The inodes whose owners were looked for when check narrowed the lookup to those its rules
    # read (owner_needs.py): an inode outside them has no owner here without having been missed.
    # None: every candidate was looked for (serve; every listener among them).
    looked_for: frozenset[int] | None = None

    def owner(self, inode: int) -> ProcessRef | None:
        return self.owners.get(inode)

    def missed(self, inode: int) -> bool:
        """Whether ``inode``'s owner was looked for and not found."""
        looked = self.looked_for is None or inode in self.looked_for
        return looked and inode not in self.owners
