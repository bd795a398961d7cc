"""Shared wording for findings: endpoints, process names, and sysctl fixes per namespace."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tcpwatch.escape import shell_comment, shell_word
from tcpwatch.model import PersistedSysctl, ProcessRef, Snapshot, lines_for
from tcpwatch.rules.base import EvidenceValue

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


# Where common servers set their listen() backlog.
_BACKLOG_SETTINGS: tuple[tuple[str, str], ...] = (
    ("nginx", "nginx: `listen {port} backlog={n};` in the server block, then `nginx -s reload`"),
    ("redis-server", "redis: `tcp-backlog {n}` in redis.conf, then restart"),
    ("gunicorn", "gunicorn: `--backlog {n}`"),
    ("uwsgi", "uWSGI: `--listen {n}`"),
    ("haproxy", "HAProxy: `backlog {n}` in the frontend/bind section"),
    ("httpd", "Apache: `ListenBacklog {n}`"),
    ("apache2", "Apache: `ListenBacklog {n}`"),
    ("php-fpm", "PHP-FPM: `listen.backlog = {n}` in the pool config"),
    ("node", "Node.js: `server.listen({{port: {port}, backlog: {n}}})`"),
    (
        "java",
        "Java: the server's accept-queue setting (Tomcat `acceptCount`, Jetty `acceptQueueSize`)",
    ),
)


def backlog_hint(owner: ProcessRef | None, port: int, backlog: int) -> str:
    """How to raise the listen() backlog of the owning program, best guess from its name."""
    if owner is not None:
        for prefix, template in _BACKLOG_SETTINGS:
            if owner.name.startswith(prefix):
                return "# " + template.format(port=port, n=backlog)
    return f"# raise the listen() backlog in the application to {backlog} (listen(fd, {backlog}))"


def suggested_backlog(current: int) -> int:
    """Twice the current backlog, rounded up to a power of two, at least 4096."""
    wanted = max(4096, current * 2)
    return 1 << (wanted - 1).bit_length()


def owner_evidence(evidence: dict[str, EvidenceValue], owner: ProcessRef | None) -> None:
    """``process`` and ``pid`` of a socket's owner; ``process`` "unknown" when not found."""
    if owner is None:
        evidence["process"] = "unknown"
        return
    evidence["process"] = owner.name
    evidence["pid"] = owner.pid


# Why a listener's owner may not take connections off its queue, per program (name prefix).
_BUSY_OWNER: tuple[tuple[str, str], ...] = (
    (
        "nginx",
        "nginx: each worker holds at most `worker_connections` connections (events block); "
        "when they run out it closes idle keep-alive connections and its error log says "
        "'worker_connections are not enough': raise it (and `worker_rlimit_nofile`) or "
        "`worker_processes`",
    ),
    (
        "haproxy",
        "haproxy: `maxconn` (global and per frontend) caps the connections it accepts: compare "
        "CurrConns with Maxconn in `show info` on its stats socket",
    ),
    (
        "redis-server",
        "redis: one thread accepts and serves every client: a slow command (`SLOWLOG GET`) "
        "stalls accepting; `maxclients` refuses clients only after accepting them",
    ),
    (
        "postgres",
        "PostgreSQL: the postmaster accepts and forks a backend per connection; forks stall "
        "under memory pressure. `max_connections` refuses sessions after the handshake, which "
        "TCP does not see",
    ),
    ("gunicorn", "gunicorn: all `--workers` busy: more workers, or async workers"),
    ("uwsgi", "uWSGI: all `--processes`/`--threads` busy"),
    ("php-fpm", "PHP-FPM: `pm.max_children` reached (its log says so)"),
    ("java", "Java: the server's worker threads are all busy (Tomcat `maxThreads`)"),
    ("node", "Node.js: one event loop accepts and serves: a blocked loop stops accepting"),
)


# Why a program leaves sockets in CLOSE_WAIT, and its own settings against it.
_CLOSE_WAIT_OWNER: tuple[tuple[str, str], ...] = (
    (
        "postgres",
        "PostgreSQL: a backend busy in a query (or waiting on a lock) does not read its socket, "
        "so it misses that its client gave up: set `client_connection_check_interval` "
        "(PostgreSQL 14+) and `statement_timeout`; now: `SELECT pg_terminate_backend(pid) FROM "
        "pg_stat_activity WHERE state = 'active' AND query_start < now() - interval '5 min'`",
    ),
    (
        "java",
        "Java: an HTTP client's pooled connections the server closed (close response bodies; "
        "evict idle connections, e.g. Apache HttpClient `evictIdleConnections`)",
    ),
)


def close_wait_hint(owner: ProcessRef | None) -> str | None:
    """A comment line on why this program leaves CLOSE_WAIT, or None for an unknown one."""
    if owner is not None:
        for prefix, text in _CLOSE_WAIT_OWNER:
            if owner.name.startswith(prefix):
                return "# " + text
    return None


def busy_owner_hint(owner: ProcessRef | None) -> str | None:
    """A comment line on why this program may stop accepting, or None for an unknown one."""
    if owner is not None:
        for prefix, text in _BUSY_OWNER:
            if owner.name.startswith(prefix):
                return "# " + text
    return None


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


def dropped_before_listener(netns: str, name: str, port: int, listener: str | None) -> list[str]:
    """Lines for SYNs to an address of this host that vanish although its listener dropped
    nothing (or nothing listens): something on this host drops them first."""
    where = (
        f"its listener here ({listener}) dropped none of them"
        if listener is not None
        else "nothing listens there, yet no reset came back"
    )
    return [
        comment(
            f"{name} is on this host and {where}: the SYNs are dropped on this host before "
            "they reach it: a local firewall rule (nftables, iptables), or a full SYN queue "
            "with tcp_syncookies=0. The network outside is not involved"
        ),
        "# the host's rules, and the packets they drop (counters beside each rule):",
        run_in(netns, f"nft list ruleset | grep -n -B2 -A2 'dport {port}'"),
        run_in(netns, f"iptables-save -c | grep -- '--dport {port}'"),
        run_in(netns, f"ss -ltnm 'sport = :{port}'") + "   # d<N>: drops at the listener itself",
    ]
