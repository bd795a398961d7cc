"""What the sysctl_files source read: the assignments in the host's sysctl configuration
files (the snapshot's ``persisted_sysctls``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PersistedSysctl:
    """One assignment in a sysctl configuration file (/etc/sysctl.conf, sysctl.d drop-ins)."""

    path: str  # as on the host, e.g. "/etc/sysctl.d/99-sysctl.conf"
    line: int  # 1-based
    name: str  # dotted, "/" separators normalised to "."; a leading "-" (ignore errors) removed
    value: str  # as written, surrounding whitespace removed


def lines_for(persisted: Iterable[PersistedSysctl], name: str) -> tuple[PersistedSysctl, ...]:
    """The assignments of one dotted name, in application order."""
    return tuple(entry for entry in persisted if entry.name == name)
