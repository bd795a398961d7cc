"""Shared wording for findings: endpoints, process names, and sysctl fixes per namespace."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tcpwatch.escape import shell_comment, shell_word
from tcpwatch.model import PersistedSysctl, ProcessRef, Snapshot, lines_for

HOST_NETNS = "host"  # the snapshot's name for the init network namespace (that of PID 1)
# The persisting line sysctl_fix writes, read back by persisted_settings (check --emit-sysctl).
_PERSIST = "echo '{name} = {value}' > /etc/sysctl.d/90-tcpwatch-{short}.conf"
_PID_NAME = re.compile(r"pid:[0-9]+")  # the name of a namespace known by a member process
_PERSISTED = re.compile(
    r"^echo '(?P<name>[a-z0-9_.]+) = (?P<value>[^'\n]*)' "
    r"> /etc/sysctl\.d/90-tcpwatch-[a-z0-9-]+\.conf$"
)


def process_subject(process: ProcessRef | None) -> str:
    """A finding's subject for a process: its name ("nginx"), or "unknown process" when not
    found. Never the pid: the subject is a label of tcpwatch_finding, and a restart must not
    make a new series (nor resolve and re-fire its alert); titles and evidence carry the pid."""
    return "unknown process" if process is None else process.name


def process_label(process: ProcessRef | None) -> str:
    """A process in titles and evidence: "nginx[1234]", or "unknown process" when not found."""
    return "unknown process" if process is None else f"{process.name}[{process.pid}]"


def process_phrase(process: ProcessRef | None) -> str:
    """For sentences: "nginx[1234]", or "the owning process" when it was not found."""
    return "the owning process" if process is None else f"{process.name}[{process.pid}]"


def comment(text: str) -> str:
    """A comment line of a fix block. ``text`` may hold host strings (process and namespace
    names, file names): a newline or control character in them is escaped, so the line cannot
    end early and turn the rest of a name into a command."""
    return "# " + shell_comment(text)


def owner_of(snapshot: Snapshot, inode: int) -> ProcessRef | None:
    if snapshot.attribution is None or inode == 0:
        return None
    return snapshot.attribution.owner(inode)


def run_in(netns: str, command: str) -> str:
    """A command as it must be typed to act on ``netns`` from the host."""
    if netns == HOST_NETNS:
        return command
    if netns.startswith("ns:") and netns[3:].isdigit():
        # An unnamed namespace is named by its inode; lsns finds a process in it to enter by.
        return f"nsenter -t $(lsns -n -o PID -t net {netns[3:]}) --net {command}"
    if _PID_NAME.fullmatch(netns):
        return f"nsenter --net=/proc/{netns[4:]}/ns/net {command}"
    # Any other name is a file name under /run/netns, which may be "pid:1;reboot" or hold a
    # newline: one shell word whatever it is.
    return f"ip netns exec {shell_word(netns)} {command}"


def sysctl_fix(
    netns: str,
    name: str,
    value: int | str,
    persisted: Sequence[PersistedSysctl] = (),
    global_setting: bool = False,
) -> str:
    """Lines that set a sysctl now and keep it across reboots.

    In the host namespace: ``sysctl -w`` plus a drop-in file of its own (one file per setting,
    so running several fixes never overwrites another's file), and a note for each persisted
    line elsewhere that sets another value and would undo the fix at boot. In another namespace
    the files under /etc/sysctl.d do not apply: the setting belongs where the namespace is made.
    """
    text = str(value)
    # Values are integers, spaces and commas: double quotes are exact and read naturally.
    assignment = f'{name}="{text}"' if " " in text else f"{name}={text}"
    lines = [run_in(netns, f"sysctl -w {assignment}")]
    if netns == HOST_NETNS or global_setting:
        short = name.rsplit(".", 1)[-1].replace("_", "-")
        lines.append(_PERSIST.format(name=name, value=text, short=short))
        for entry in lines_for(persisted, name):
            if entry.value.split() != text.split() and not entry.path.endswith(
                f"90-tcpwatch-{short}.conf"
            ):
                lines.append(
                    comment(
                        f"{entry.path}:{entry.line} sets {name} = {entry.value}: "
                        "change or remove that line, or it may undo this at boot"
                    )
                )
    else:
        lines.append(
            comment(
                f"{name} is per network namespace and /etc/sysctl.d does not apply to "
                f"'{netns}': set it where the namespace is created "
                f"(docker run --sysctl {assignment}, "
                "Kubernetes securityContext.sysctls, or the script that runs `ip netns add`)"
            )
        )
    return "\n".join(lines)


def persisted_settings(remediation: str) -> list[tuple[str, str]]:
    """The (sysctl, value) pairs a remediation persists under /etc/sysctl.d, in its order.

    Reads back exactly the lines :func:`sysctl_fix` writes (the format is defined once, above),
    so a finding from a JSON report (``check --from``) yields them too.
    """
    found = (_PERSISTED.match(line.strip()) for line in remediation.splitlines())
    return [(match["name"], match["value"]) for match in found if match is not None]


def format_port_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """((8080, 8080), (9000, 9010)) -> "8080,9000-9010" (ip_local_reserved_ports syntax)."""
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


DEFAULT_PORT_RANGE = (32768, 60999)  # the kernel's default ip_local_port_range
# The wider range P01 proposes: ends of different parity, above the ports most services use.
WIDE_PORT_RANGE = (15000, 64999)


def ports_to_reserve(snapshot: Snapshot) -> list[int]:
    """Listener and self-connect ports that are, or may become, ephemeral and are not reserved.

    "May become": inside the current range or a range a fix proposes (K08 the default range, P01
    the wide one). Writing ip_local_reserved_ports replaces the whole list, so every fix that
    reserves ports reserves this one list: applying several findings' fixes, in any order, never
    drops a reservation another one needs.
    """
    sysctls, sockets = snapshot.sysctls, snapshot.sockets
    if sockets is None or sysctls is None or sysctls.port_range is None:
        return []
    low = min(sysctls.port_range[0], DEFAULT_PORT_RANGE[0], WIDE_PORT_RANGE[0])
    high = max(sysctls.port_range[1], DEFAULT_PORT_RANGE[1], WIDE_PORT_RANGE[1])
    ports = {lsn.port for lsn in sockets.listeners if low <= lsn.port <= high}
    ports |= {sock.port for sock in sockets.self_connects if low <= sock.port <= high}
    return sorted(port for port in ports if not sysctls.port_reserved(port))


def reserve_ports_fix(
    netns: str, snapshot: Snapshot, persisted: Sequence[PersistedSysctl] = ()
) -> str | None:
    """The command reserving :func:`ports_to_reserve` plus what is reserved already, if needed;
    advice to add them by hand when what is reserved already is unknown (the file was unusable),
    since the command replaces the whole list."""
    ports = ports_to_reserve(snapshot)
    if not ports or snapshot.sysctls is None:
        return None
    if not snapshot.sysctls.reserved_ports_known:
        return manual_reservation(*ports)
    merged = sorted({*snapshot.sysctls.reserved_ports, *((port, port) for port in ports)})
    return sysctl_fix(
        netns, "net.ipv4.ip_local_reserved_ports", format_port_ranges(merged), persisted
    )


def manual_reservation(*ports: int) -> str:
    """Advice for when the current reservations are unknown, so no exact command can be given."""
    listed = format_port_ranges([(port, port) for port in ports])
    return (
        f"# add {listed} to net.ipv4.ip_local_reserved_ports, keeping the ports already listed "
        "there (writing the sysctl replaces the whole list)"
    )
