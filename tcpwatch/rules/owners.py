"""Q rules about the process behind a listener (from the ``owners`` source: psutil).

Kept apart from queues.py, which judges the queues themselves, to keep both modules short.
"""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.model import OwnerProcess
from tcpwatch.rules.base import EvidenceValue, Finding, Thresholds, Window, rule
from tcpwatch.rules.fixes import owner_of, run_in
from tcpwatch.rules.shapes import ratio_severity, ratio_thresholds
from tcpwatch.rules.shared import listener_groups

# --- Q05 -------------------------------------------------------------------------------------


def suggested_nofile(process: OwnerProcess) -> int:
    """A soft limit with room: four times the descriptors open now, a power of two, at least
    65536 (systemd's default hard limit is 524288)."""
    wanted = max(65536, process.open_fds * 4)
    return 1 << (wanted - 1).bit_length()


def nofile_fix(process: OwnerProcess, netns: str) -> str:
    """How to raise the owner's RLIMIT_NOFILE where it is started, and how to verify."""
    pid, new = process.pid, suggested_nofile(process)
    hard = process.max_fds_hard
    raise_hard = hard is not None and hard < new  # the soft limit may not pass the hard one
    unit_value = f"{new}" if raise_hard else f"{new}:{'infinity' if hard is None else hard}"
    prlimit_value = f"{new}" if raise_hard else f"{new}:"  # "N:" sets only the soft limit
    return "\n".join(
        [
            f"# first rule out a descriptor leak: what are the {process.open_fds} fds?",
            f"ls -l /proc/{pid}/fd | awk '{{print $NF}}' | cut -d: -f1 | sort | uniq -c"
            " | sort -rn | head",
            run_in(netns, f"ss -tanp | grep 'pid={pid},' | awk '{{print $1}}' | sort | uniq -c")
            + "   # its sockets by state (S01: CLOSE_WAIT)",
            "# then raise the limit where the process is started:",
            f"systemctl status {pid}   # names its unit, if systemd started it",
            f"# systemd: `systemctl edit UNIT`, add [Service] LimitNOFILE={unit_value}, then "
            "`systemctl restart UNIT`",
            f"# a shell or init script: `ulimit -n {new}` before the program starts (at most the "
            "hard limit, `ulimit -Hn`); login sessions: nofile in /etc/security/limits.conf",
            f"# a container: `docker run --ulimit nofile={new}:{new}`, or the runtime's default "
            "(LimitNOFILE= of containerd.service or docker.service)",
            f"prlimit --pid {pid} --nofile={prlimit_value}"
            "   # raises it now, until the process restarts",
            f"# verify: grep 'open files' /proc/{pid}/limits   # and tcpwatch check shows no Q05",
        ]
    )


@rule(
    "Q05",
    "listener-owner-near-fd-limit",
    "warning",
    "A listener's owning process is near its file-descriptor limit: accept() will fail with EMFILE",
    thresholds=ratio_thresholds("open fds / RLIMIT_NOFILE soft limit", warning=0.8, critical=0.95),
)
def Q05(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    described = snapshot.owner_processes
    if described is None:
        return
    listeners: dict[int, list[str]] = {}
    queued: dict[int, int] = {}
    for group in listener_groups(snapshot):
        for listener in group.sockets:
            owner = owner_of(snapshot, listener.inode)
            if owner is None:
                continue
            names = listeners.setdefault(owner.pid, [])
            if group.name not in names:
                names.append(group.name)
            queued[owner.pid] = queued.get(owner.pid, 0) + listener.queue_length
    for pid, names in sorted(listeners.items()):
        process = described.get(pid)
        if process is None or not process.max_fds:
            continue  # not described (exited, denied) or no limit (RLIM_INFINITY)
        ratio = process.open_fds / process.max_fds
        severity = ratio_severity(ratio, thresholds)
        if severity is None:
            continue
        evidence: dict[str, EvidenceValue] = {
            "process": process.name,
            "pid": pid,
            "user": process.user,
            "open_fds": process.open_fds,
            "max_fds": process.max_fds,
        }
        if process.max_fds_hard is not None:
            evidence["max_fds_hard"] = process.max_fds_hard
        evidence["fd_ratio"] = round(ratio, 4)
        evidence["listeners"] = ", ".join(names)
        evidence["accept_queue_length"] = queued.get(pid, 0)
        evidence["started_at"] = round(process.started_at, 3)
        label = f"{process.name}[{pid}]"
        title = (
            f"{label}, listening on {names[0]}{' and more' if len(names) > 1 else ''}, holds "
            f"{process.open_fds} of its {process.max_fds} file descriptors"
            + (": accept() is failing with EMFILE" if ratio >= 1 else "")
        )
        yield Q05.finding(
            window,
            title,
            evidence,
            nofile_fix(process, snapshot.netns),
            subject=process.name,  # never the pid: a restart must keep the series
            severity=severity,
        )
