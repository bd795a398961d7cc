"""Which sockets' owners the rules read: what a one-shot check must look for, and no more.

Finding a socket's owner means reading /proc/PID/fd of process after process (~3.7 us a
descriptor, ~0.5 s on a host holding 139,000 of them), and `check` has no earlier poll to
remember owners from. Most of them are never read: a rule names the owner of the listener or
connection it flags, S01 groups the CLOSE_WAIT sockets by owner only once there are enough of
them to reach its threshold, Q05 judges the processes behind the listeners.

So the rules are asked instead of declaring it by hand: they run once over the owner-less
snapshots with an attribution that notes every inode looked up (:class:`AskedOwners`) and an
empty ``owner_processes`` (so Q05 goes through every listener). Only those inodes are then looked
for, and the rules run again with the owners found, still noting; when they ask for one not yet
looked for (a rule that names a second socket after seeing the first one's owner), it is looked
for in turn. Once nothing new is asked, every owner the rules read is the one a full walk gives:
a rule's findings depend on the attribution only through the owners it asks about (and
``complete``/``processes_denied``, which mean the same for the narrowed set). A rule that lists
the whole attribution (iterates it) gets every candidate, as before.

The daemon does not do this: it keeps every candidate's owner between polls (one readlink each),
for its metrics and /api/v1/owners as much as for its rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from tcpwatch.audit import audit
from tcpwatch.model import Attribution, OwnerProcesses, ProcessRef, Snapshot
from tcpwatch.rules import RuleSettings

MAX_ROUNDS = 4  # lookups before giving up narrowing: then every candidate's owner is looked for


class AskedOwners(Mapping[int, ProcessRef]):
    """The owners found so far, noting each inode a rule looks up (``asked``); ``everything``
    once a rule lists them all. Lives for one probing run of the rules."""

    def __init__(self, found: Mapping[int, ProcessRef]) -> None:
        self._found = found
        self.asked: set[int] = set()
        self.everything = False

    def __getitem__(self, inode: int) -> ProcessRef:
        self.asked.add(inode)
        return self._found[inode]

    def __contains__(self, inode: object) -> bool:
        if isinstance(inode, int):
            self.asked.add(inode)
        return inode in self._found

    def get(self, inode: int, default: ProcessRef | None = None) -> ProcessRef | None:  # type: ignore[override]
        self.asked.add(inode)
        return self._found.get(inode, default)

    def __iter__(self) -> Iterator[int]:
        self.everything = True
        return iter(self._found)

    def __len__(self) -> int:
        self.everything = True
        return len(self._found)


def asked_owners(
    snapshots: Sequence[Snapshot],
    starts: Mapping[str, Snapshot],
    settings: Mapping[str, RuleSettings],
    close_wait_first_seen: Mapping[str, Mapping[int, float]],
) -> frozenset[int] | None:
    """The socket inodes whose owners the rules read over ``snapshots`` (their attribution so
    far, None for none yet); None when a rule wants every owner. Arguments as for ``audit``."""
    probes: list[AskedOwners] = []
    probed: list[Snapshot] = []
    for snapshot in snapshots:
        found = snapshot.attribution
        probe = AskedOwners({} if found is None else found.owners)
        probes.append(probe)
        attribution = (
            Attribution(probe, 0, complete=False) if found is None else replace(found, owners=probe)
        )
        described = snapshot.owner_processes or OwnerProcesses({}, 0)
        probed.append(replace(snapshot, attribution=attribution, owner_processes=described))
    audit(probed, starts, settings, close_wait_first_seen)
    if any(probe.everything for probe in probes):
        return None
    asked = frozenset().union(*(probe.asked for probe in probes))
    return asked - {0}
