"""P rules: the ephemeral port range, as outgoing connections and listeners use it."""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.endpoints import endpoint, ports_available
from tcpwatch.rules.base import (
    EvidenceValue,
    Finding,
    Threshold,
    Thresholds,
    Window,
    rule,
)
from tcpwatch.rules.fixes import (
    WIDE_PORT_RANGE,
    comment,
    manual_reservation,
    owner_of,
    process_label,
    process_phrase,
    reserve_ports_fix,
    run_in,
    sysctl_fix,
)
from tcpwatch.rules.shapes import ratio_severity
from tcpwatch.rules.shared import listener_groups

# --- P01 -------------------------------------------------------------------------------------


@rule(
    "P01",
    "ephemeral-exhaustion",
    "critical",
    "Connections to one destination use most of the ephemeral port range",
    thresholds=(
        Threshold(
            "warning",
            0.5,
            0.01,
            1.0,
            "ratio",
            "sockets to one (source, destination, port) / available ephemeral ports to warn",
        ),
        Threshold(
            "critical",
            0.8,
            0.01,
            1.0,
            "ratio",
            "sockets to one (source, destination, port) / available ephemeral ports for critical",
        ),
    ),
    sysctls=(
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_tw_reuse",
    ),
)
def P01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    sysctls, sockets = snapshot.sysctls, snapshot.sockets
    if sysctls is None or sockets is None or sysctls.port_range is None:
        return
    low, high = sysctls.port_range
    available = ports_available(low, high, sysctls.reserved_ports)
    tw_reuse = sysctls.get("net.ipv4.tcp_tw_reuse")
    netns = snapshot.netns
    for use in sockets.ephemeral_use:  # largest first
        usage = use.sockets / max(available, 1)
        severity = ratio_severity(usage, thresholds)
        if severity is None:
            break
        destination = endpoint(use.address, use.port)
        subject = f"{use.source} -> {destination}"
        evidence: dict[str, EvidenceValue] = {
            "source": use.source,
            "destination": destination,
            "sockets": use.sockets,
            "time_wait": use.time_wait,
            "ports_available": available,
            "port_range": f"{low}-{high}",
            "usage_ratio": round(usage, 4),
        }
        if tw_reuse is not None:
            evidence["tcp_tw_reuse"] = tw_reuse
        if not sysctls.reserved_ports_known:
            # The whole range counted: the usage shown is a floor, never an overstatement.
            evidence["reserved_ports"] = "unknown (counted as none)"
        lines = [
            f"# every connection from {use.source} to {destination} needs its own local port; "
            f"{available} exist, {use.sockets} are taken ({use.time_wait} by TIME_WAIT, 60 s "
            "each): connect() fails with EADDRNOTAVAIL when they run out, and gets slower "
            "past half the range",
            "# 1. reuse connections (HTTP keep-alive, a connection pool) instead of one "
            "connection per request",
        ]
        if use.time_wait * 2 >= use.sockets and tw_reuse != 1:
            lines.append(
                "# 2. most are TIME_WAIT from closing outgoing connections: let new outgoing "
                "connections reuse them (safe with TCP timestamps, which are on by default):"
            )
            lines.append(sysctl_fix(netns, "net.ipv4.tcp_tw_reuse", 1, window.persisted_sysctls))
        if (low, high) != WIDE_PORT_RANGE and high - low < WIDE_PORT_RANGE[1] - WIDE_PORT_RANGE[0]:
            # The kernel refuses a range starting below ip_unprivileged_port_start (EINVAL).
            unprivileged = sysctls.get("net.ipv4.ip_unprivileged_port_start") or 0
            wide_low = max(min(low, WIDE_PORT_RANGE[0]), unprivileged)
            wide_high = max(high, WIDE_PORT_RANGE[1])
            if wide_low % 2 == wide_high % 2:
                wide_high -= 1
            lines.append("# 3. widen the range; first reserve the listener ports inside it:")
            reservation = reserve_ports_fix(netns, snapshot, window.persisted_sysctls)
            if reservation:
                lines.append(reservation)
            lines.append(
                sysctl_fix(
                    netns,
                    "net.ipv4.ip_local_port_range",
                    f"{wide_low} {wide_high}",
                    window.persisted_sysctls,
                )
            )
        lines.append(
            "# or spread the load: more destination addresses/ports, or several source addresses "
            "(each pair has its own ports); clients that bind() before connect() should set "
            "IP_BIND_ADDRESS_NO_PORT"
        )
        lines.append("# verify: " + run_in(netns, f"ss -tan 'dst {destination}' | wc -l"))
        yield P01.finding(
            window,
            f"{use.sockets} connections from {use.source} to {destination} use {usage:.0%} of "
            f"the {available} ephemeral ports",
            evidence,
            "\n".join(lines),
            subject=subject,
            severity=severity,
        )


# --- P02 -------------------------------------------------------------------------------------


@rule(
    "P02",
    "listener-in-ephemeral-range",
    "warning",
    "A listening port lies inside ip_local_port_range and is not reserved",
    sysctls=("net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports"),
)
def P02(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    snapshot = window.current
    sysctls = snapshot.sysctls
    if sysctls is None or sysctls.port_range is None or snapshot.sockets is None:
        return
    low, high = sysctls.port_range
    netns = snapshot.netns
    for group in listener_groups(snapshot):
        if not low <= group.port <= high or sysctls.port_reserved(group.port):
            continue
        if not sysctls.reserved_ports_known:
            continue  # it may be reserved: the sysctl source reports the unreadable list
        owner = owner_of(snapshot, group.sockets[0].inode)
        evidence: dict[str, EvidenceValue] = {
            "listener": group.name,
            "port": group.port,
            "port_range": f"{low}-{high}",
        }
        if owner is None:
            evidence["process"] = "unknown"
        else:
            evidence["process"] = owner.name
            evidence["pid"] = owner.pid
        remediation = "\n".join(
            [
                comment(
                    f"an outgoing connection may take port {group.port} while "
                    f"{process_phrase(owner)} is restarting (bind() then fails with "
                    "EADDRINUSE), and a client of this port can connect to itself while it is "
                    "down"
                ),
                "# reserve it (the list repeats the current reservations: writing replaces it):",
                reserve_ports_fix(netns, snapshot, window.persisted_sysctls)
                or manual_reservation(group.port),
                f"# or move the service to a port below {low}",
            ]
        )
        yield P02.finding(
            window,
            f"{group.name} ({process_label(owner)}) listens inside the ephemeral port range "
            f"{low}-{high}",
            evidence,
            remediation,
            subject=group.name,
        )
