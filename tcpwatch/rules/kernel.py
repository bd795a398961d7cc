"""K rules: kernel tunables that are set wrong (the limits the kernel is close to: limits.py).

Each check reads ``window.current.sysctls`` and yields nothing when the sysctl source failed
or the tunable is absent there (tcp_mem and tcp_max_orphans exist only in the host namespace).
"""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.endpoints import endpoint
from tcpwatch.escape import shell_word
from tcpwatch.model import Sysctls, lines_for
from tcpwatch.rules.base import (
    EvidenceValue,
    Finding,
    Severity,
    Threshold,
    Thresholds,
    Window,
    required,
    rule,
)
from tcpwatch.rules.fixes import (
    DEFAULT_PORT_RANGE,
    HOST_NETNS,
    reserve_ports_fix,
    run_in,
    sysctl_fix,
)
from tcpwatch.rules.shapes import add_counter, add_window, bad_sysctl_rule
from tcpwatch.rules.shared import TIME_WAIT_SECONDS, dropping_listeners, no_cookie_syn_limit


def _sysctls(window: Window) -> Sysctls | None:
    return window.current.sysctls


# --- K01 -------------------------------------------------------------------------------------


@rule(
    "K01",
    "syncookies-disabled",
    "warning",
    "SYN cookies are disabled (net.ipv4.tcp_syncookies = 0)",
    sysctls=("net.ipv4.tcp_syncookies", "net.ipv4.tcp_max_syn_backlog"),
    counters=("TcpExtTCPReqQFullDrop",),
)
def K01(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = _sysctls(window)
    if sysctls is None or sysctls.get("net.ipv4.tcp_syncookies") != 0:
        return
    max_syn_backlog = sysctls.get("net.ipv4.tcp_max_syn_backlog")
    evidence: dict[str, EvidenceValue] = {"tcp_syncookies": 0}
    if max_syn_backlog is not None:
        evidence["tcp_max_syn_backlog"] = max_syn_backlog
    drops = add_counter(evidence, window, "TcpExtTCPReqQFullDrop")
    add_window(evidence, window)
    crowded: list[str] = []
    sockets = window.current.sockets
    if sockets is not None:
        for listener in sockets.listeners:
            limit = no_cookie_syn_limit(listener.queue_max, max_syn_backlog)
            if listener.syn_recv > 0 and listener.syn_recv >= limit:
                crowded.append(f"{endpoint(listener.address, listener.port)} ({listener.syn_recv})")
    # A SYN queue fills and drains between polls: the listeners that dropped during the window
    # are named too.
    named = {entry.split(" ", 1)[0] for entry in crowded}
    for group, dropped in dropping_listeners(window) if drops else ():
        if group.name not in named:
            crowded.append(f"{group.name} ({dropped} dropped)")
    if crowded:
        evidence["listeners_dropping_syns"] = ", ".join(crowded)
    dropping = bool(drops) or bool(crowded)
    severity: Severity = "critical" if dropping else "warning"
    title = (
        "SYN cookies are off and SYNs are being dropped: new connections are lost"
        if dropping
        else "SYN cookies are off: a SYN flood or a burst of connections will drop clients"
    )
    remediation = "\n".join(
        [
            sysctl_fix(
                window.current.netns, "net.ipv4.tcp_syncookies", 1, window.persisted_sysctls
            ),
            "# verify: SYNs beyond a full SYN queue are now answered with cookies:",
            run_in(
                window.current.netns, "nstat -az TcpExtTCPReqQFullDrop TcpExtTCPReqQFullDoCookies"
            ),
        ]
    )
    yield K01.finding(window, title, evidence, remediation, severity=severity)


# --- K02 -------------------------------------------------------------------------------------

K02 = bad_sysctl_rule(
    "K02",
    "syncookies-forced",
    "warning",
    "SYN cookies are forced for every connection (net.ipv4.tcp_syncookies = 2)",
    sysctl="net.ipv4.tcp_syncookies",
    bad=lambda value: value == 2,
    fix=1,
    finding_title="every SYN is answered with a SYN cookie (tcp_syncookies = 2, a test mode): "
    "connections lose TCP options when timestamps are off",
    counters=("TcpExtSyncookiesSent",),
)


# --- K03 -------------------------------------------------------------------------------------


@rule(
    "K03",
    "tw-recycle-enabled",
    "critical",
    "net.ipv4.tcp_tw_recycle is enabled, or still set in a sysctl file",
    sysctls=("net.ipv4.tcp_tw_recycle",),
)
def K03(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = _sysctls(window)
    if sysctls is None:
        return
    name = "net.ipv4.tcp_tw_recycle"
    netns = window.current.netns
    value = sysctls.get(name)
    if value is not None:
        if value != 0:
            yield K03.finding(
                window,
                "tcp_tw_recycle is on: clients behind NAT fail to connect",
                {"tcp_tw_recycle": value},
                sysctl_fix(netns, name, 0, window.persisted_sysctls),
            )
        return
    # The running kernel has no such sysctl (removed in 4.12); flag leftovers once, on the host.
    leftovers = lines_for(window.persisted_sysctls, name)
    if netns != HOST_NETNS or not leftovers:
        return
    by_file: dict[str, list[int]] = {}
    for entry in leftovers:
        by_file.setdefault(entry.path, []).append(entry.line)
    commands = [
        "sed -i "
        + " ".join(
            f"-e '{line}s/^/# tcp_tw_recycle was removed in Linux 4.12: /'" for line in lines
        )
        + f" {shell_word(path)}"  # a file name: it may hold a space, a ; or a newline
        for path, lines in by_file.items()
    ]
    yield K03.finding(
        window,
        "a sysctl file still sets tcp_tw_recycle, which this kernel no longer has",
        {
            "kernel_has_tcp_tw_recycle": "no",
            "persisted_lines": ", ".join(
                f"{e.path}:{e.line} ({e.name} = {e.value})" for e in leftovers
            ),
        },
        "\n".join(
            [
                "# harmless at runtime, but `sysctl --system` reports an error at every boot and "
                "the line misleads readers; comment it out:",
                *commands,
            ]
        ),
        severity="info",
    )


# --- K04 -------------------------------------------------------------------------------------

K04 = bad_sysctl_rule(
    "K04",
    "abort-on-overflow",
    "warning",
    "net.ipv4.tcp_abort_on_overflow = 1: a full accept queue resets clients",
    sysctl="net.ipv4.tcp_abort_on_overflow",
    bad=lambda value: value == 1,
    fix=0,
    finding_title="tcp_abort_on_overflow is on: when an accept queue overflows, clients get a "
    "reset instead of a retry",
    counters=("TcpExtListenOverflows",),
    after=(
        "# then make the application accept() faster (see Q01): with 0, a burst that "
        "overflows the queue is retried by the client instead of reset",
    ),
)


# --- K05 -------------------------------------------------------------------------------------


@rule(
    "K05",
    "somaxconn-low",
    "warning",
    "net.core.somaxconn is below the recommended minimum",
    thresholds=(
        Threshold(
            "minimum",
            4096,
            1,
            1 << 20,
            "sockets",
            "warn when net.core.somaxconn is below this (the kernel default since 5.4)",
        ),
    ),
    sysctls=("net.core.somaxconn",),
)
def K05(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = _sysctls(window)
    if sysctls is None:
        return
    somaxconn = sysctls.get("net.core.somaxconn")
    minimum = int(required(thresholds, "minimum"))
    if somaxconn is None or somaxconn >= minimum:
        return
    evidence: dict[str, EvidenceValue] = {"somaxconn": somaxconn, "minimum": minimum}
    sockets = window.current.sockets
    if sockets is not None:
        capped = sorted(
            {
                endpoint(lsn.address, lsn.port)
                for lsn in sockets.listeners
                if lsn.queue_max == somaxconn
            }
        )
        evidence["listeners_at_somaxconn"] = len(capped)
        if capped:
            evidence["listeners_capped"] = ", ".join(capped[:10]) + (
                f" (+{len(capped) - 10} more)" if len(capped) > 10 else ""
            )
    remediation = "\n".join(
        [
            sysctl_fix(
                window.current.netns, "net.core.somaxconn", minimum, window.persisted_sysctls
            ),
            "# the cap is applied when listen() is called: restart or reload the listening "
            "services, and raise their own backlog setting where it is lower",
        ]
    )
    yield K05.finding(
        window,
        f"net.core.somaxconn is {somaxconn}: every listen() backlog is cut to it",
        evidence,
        remediation,
    )


# --- K08 -------------------------------------------------------------------------------------


@rule(
    "K08",
    "port-range",
    "warning",
    "ip_local_port_range is narrow, overlaps privileged ports, or has ends of equal parity",
    thresholds=(
        Threshold(
            "minimum_ports",
            10000,
            1,
            65535,
            "ports",
            "warn when ip_local_port_range holds fewer ports than this",
        ),
    ),
    sysctls=(
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.ip_local_reserved_ports",
    ),
)
def K08(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = _sysctls(window)
    if sysctls is None or sysctls.port_range is None:
        return
    low, high = sysctls.port_range
    size = high - low + 1
    minimum = int(required(thresholds, "minimum_ports"))
    unprivileged = sysctls.get("net.ipv4.ip_unprivileged_port_start")
    netns = window.current.netns
    problems: list[str] = []
    severity: Severity = "info"
    if size < minimum:
        problems.append(f"only {size} ports (< {minimum})")
        severity = "warning"
    if unprivileged is not None and low < unprivileged:
        problems.append(f"starts below ip_unprivileged_port_start ({unprivileged})")
        severity = "warning"
    if low % 2 == high % 2:
        problems.append("both ends have the same parity")
    persisted_rejected = ""
    if netns == HOST_NETNS and unprivileged is not None:
        for entry in lines_for(window.persisted_sysctls, "net.ipv4.ip_local_port_range"):
            words = entry.value.split()
            if len(words) == 2 and words[0].isdigit() and int(words[0]) < unprivileged:
                persisted_rejected = f"{entry.path}:{entry.line} ({entry.value})"
                problems.append(
                    f"{persisted_rejected} starts below ip_unprivileged_port_start: the kernel "
                    "rejects it at boot (EINVAL), so that range is not in effect"
                )
                severity = "warning"
    if not problems:
        return
    evidence: dict[str, EvidenceValue] = {
        "port_range_low": low,
        "port_range_high": high,
        "ports": size,
    }
    if unprivileged is not None:
        evidence["ip_unprivileged_port_start"] = unprivileged
    if persisted_rejected:
        evidence["rejected_persisted_line"] = persisted_rejected
    evidence["problems"] = "; ".join(problems)
    new_low = max(low, unprivileged or 0) if size >= minimum else DEFAULT_PORT_RANGE[0]
    new_high = high if size >= minimum else DEFAULT_PORT_RANGE[1]
    if new_low % 2 == new_high % 2:
        new_high -= 1
    lines: list[str] = []
    reservation = reserve_ports_fix(netns, window.current, window.persisted_sysctls)
    if reservation and (new_low, new_high) != (low, high):
        lines.append("# first reserve the listener ports inside the new range (see P02):")
        lines.append(reservation)
    lines.append(
        sysctl_fix(
            netns, "net.ipv4.ip_local_port_range", f"{new_low} {new_high}", window.persisted_sysctls
        )
    )
    remediation = "\n".join(lines)
    yield K08.finding(
        window,
        f"ip_local_port_range {low}-{high}: " + "; ".join(problems),
        evidence,
        remediation,
        severity=severity,
    )


# --- K09 -------------------------------------------------------------------------------------


@rule(
    "K09",
    "keepalive-vs-idle-timeout",
    "warning",
    "tcp_keepalive_time is longer than the declared middlebox idle timeout",
    thresholds=(
        Threshold(
            "idle_timeout",
            None,
            1,
            86400,
            "seconds",
            "idle timeout of the load balancer / NAT / firewall in the path; "
            "the rule is silent until it is set",
        ),
    ),
    sysctls=("net.ipv4.tcp_keepalive_time",),
)
def K09(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    idle_timeout = thresholds.get("idle_timeout")
    sysctls = _sysctls(window)
    if idle_timeout is None or sysctls is None:
        return
    keepalive = sysctls.get("net.ipv4.tcp_keepalive_time")
    if keepalive is None or keepalive < idle_timeout:
        return
    suggested = max(int(idle_timeout * 0.8), 1)
    evidence: dict[str, EvidenceValue] = {
        "tcp_keepalive_time": keepalive,
        "idle_timeout": int(idle_timeout) if float(idle_timeout).is_integer() else idle_timeout,
        "suggested_keepalive_time": suggested,
    }
    remediation = "\n".join(
        [
            sysctl_fix(
                window.current.netns,
                "net.ipv4.tcp_keepalive_time",
                suggested,
                window.persisted_sysctls,
            ),
            "# keepalive only runs on sockets with SO_KEEPALIVE, and TCP_KEEPIDLE set by the "
            "application overrides this default: enable keepalive in the client/pool settings",
        ]
    )
    yield K09.finding(
        window,
        f"tcp_keepalive_time {keepalive} s >= idle timeout {idle_timeout:g} s: idle connections "
        "are dropped by the middlebox before the first keepalive probe",
        evidence,
        remediation,
    )


# --- K10 -------------------------------------------------------------------------------------

K10 = bad_sysctl_rule(
    "K10",
    "fin-timeout-misread",
    "info",
    "tcp_fin_timeout was changed, probably to shorten TIME_WAIT, which it does not do",
    sysctl="net.ipv4.tcp_fin_timeout",
    bad=lambda value: value != 60,
    fix=60,
    finding_title=lambda value: (
        f"tcp_fin_timeout is {value} s: it only bounds orphaned "
        f"FIN_WAIT2 sockets; TIME_WAIT stays {TIME_WAIT_SECONDS} s"
    ),
    facts={"kernel_default": 60, "time_wait_seconds": TIME_WAIT_SECONDS},
    before=(
        "# nothing is broken; if the goal was fewer TIME_WAIT sockets, this setting does not "
        "do it: reuse connections instead (keep-alive, pools).",
        "# to return to the default:",
    ),
)
