"""What a check covered, said in its text report: a healthy host should learn more than
"no findings". One line under the status (rules, namespaces, window, listeners and sockets), a
note when owners could not be named for want of privilege (and which would name them), and with
--verbose each namespace's sources with their times and its sockets by state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tcpwatch.escape import terminal
from tcpwatch.model import STATES, Snapshot

# The capabilities that name another user's socket owners: listing /proc/PID/fd (mode 0500)
# needs CAP_DAC_READ_SEARCH, reading its links passes a ptrace access check (CAP_SYS_PTRACE).
OWNER_PRIVILEGE = (
    "run as root, or with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH as tcpwatch.service grants"
)


@dataclass(frozen=True, slots=True)
class OwnersOrigin:
    """Where check's owners came from, beyond its own walk of /proc/*/fd (cli_owners.py)."""

    daemon: str = ""  # the local daemon whose locations were confirmed: URL and pid, or ""
    offered: int = 0  # locations its answer gave
    note: str = ""  # why its owners were not used ("" when they were)


@dataclass(frozen=True, slots=True)
class Scope:
    """What the check was asked to cover, beyond what its snapshots hold."""

    rules: int  # rules enabled (evaluated in every namespace)
    window: float  # seconds between the two snapshots; 0: one snapshot
    daemon: str = ""  # with --from: the daemon's URL, whose poll was read
    privileged: bool = False  # the check held CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH
    owners: OwnersOrigin | None = None  # None: no local daemon was asked (--from, no owners)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "es" if word.endswith("s") else "s")


def checked_line(snapshots: Sequence[Snapshot], scope: Scope) -> str:
    """``checked  24 rules in 1 namespace over a 5 s window: 4 listeners, 120 TCP sockets``."""
    where = _plural(len(snapshots), "namespace")
    if scope.daemon:
        window = f"the daemon's last {scope.window:g} s" if scope.window else "its last poll"
        return f"checked  by the daemon at {scope.daemon}: {where}, {window}"
    if scope.window > 0:
        window = f" over a {scope.window:g} s window"
    else:
        window = (
            ", one snapshot (--window 0: no counter seen moving, and no lifecycle source: "
            "connection outcomes need a window)"
        )
    tables = [s.sockets for s in snapshots if s.sockets is not None]
    listeners = sum(len(table.listeners) for table in tables)
    sockets = sum(table.total(state) for table in tables for state in STATES)
    return (
        f"checked  {_plural(scope.rules, 'rule')} in {where}{window}: "
        f"{_plural(listeners, 'listener')}, {_plural(sockets, 'TCP socket')}"
    )


def owners_of(snapshots: Sequence[Snapshot], scope: Scope) -> dict[str, Any] | None:
    """Where the owners came from: the JSON report's ``checked.owners`` (docs/check-json.md);
    None when the owners were not looked for here."""
    found = next((s.attribution for s in snapshots if s.attribution is not None), None)
    if scope.owners is None or found is None:
        return None
    origin = scope.owners
    return {
        "daemon": origin.daemon or None,
        "offered": origin.offered if origin.daemon else None,
        "confirmed": found.confirmed,
        "processes_walked": found.processes_scanned,
        "daemon_note": origin.note or None,
    }


def owners_line(snapshots: Sequence[Snapshot], scope: Scope, verbose: bool) -> str | None:
    """``owners   145 confirmed (one readlink each; 146 named) from the local daemon ...``: where
    the owners came from, when a daemon's were used (always said) or, with --verbose, why not.
    check confirms only the owners its rules read, so fewer than named is no failure."""
    shown = owners_of(snapshots, scope)
    if shown is None or not (shown["daemon"] or verbose):
        return None
    walked = _plural(shown["processes_walked"], "process") + "' descriptors read"
    if shown["daemon"]:
        return (
            f"owners   {shown['confirmed']} confirmed (one readlink each; "
            f"{shown['offered']} named) from the local daemon at {terminal(shown['daemon'])}; "
            f"{walked}"
        )
    return f"owners   from /proc/*/fd, {walked}: {terminal(shown['daemon_note'] or '')}"


def privilege_note(snapshots: Sequence[Snapshot], privileged: bool) -> str | None:
    """Why some owners have no name, and what would name them; None when nothing was denied."""
    worst: tuple[int, int] | None = None
    for snapshot in snapshots:
        found = snapshot.attribution
        if found is None or not found.processes_denied or found.complete:
            continue
        unnamed = 0
        if snapshot.sockets is not None:
            # Only the listeners looked for: check's narrowed lookup skips those no rule reads.
            unnamed = sum(1 for lsn in snapshot.sockets.listeners if found.missed(lsn.inode))
        if worst is None or (found.processes_denied, unnamed) > worst:
            worst = (found.processes_denied, unnamed)
    if worst is None:
        return None
    denied, unnamed = worst
    who = f"{_plural(unnamed, 'listener')} without an owner; " if unnamed else ""
    fix = (
        "even with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: a security module, or a process "
        "changing its credentials, refused it"
        if privileged
        else OWNER_PRIVILEGE
    )
    return (
        f"owners not all named: {who}the descriptors of {_plural(denied, 'process')} could not "
        f"be read ({fix})"
    )


def verbose_lines(snapshot: Snapshot) -> list[str]:
    """A namespace's sources with their times, and its sockets by state."""
    lines = []
    if snapshot.sources:
        timed = ", ".join(
            f"{s.name} {s.duration_seconds * 1000:.1f} ms" + ("" if s.ok else " (failed)")
            for s in snapshot.sources
        )
        lines.append(f"  sources: {timed}")
    if snapshot.sockets is not None:
        states = ", ".join(
            f"{snapshot.sockets.total(state)} {state.replace('_', '-')}"
            for state in STATES
            if snapshot.sockets.total(state)
        )
        lines.append(f"  sockets: {states or 'none'}")
    return lines
