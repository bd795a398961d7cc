"""K rules about limits the kernel is close to: TIME_WAIT buckets, orphans, TCP memory.

Each check yields nothing when a source it needs failed or the tunable is absent in this
namespace (tcp_mem and tcp_max_orphans exist only in the host namespace).
"""

from __future__ import annotations

from collections.abc import Iterator

from tcpwatch.model import Sysctls
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
from tcpwatch.rules.fixes import run_in, sysctl_fix
from tcpwatch.rules.shapes import add_counter, add_window, ratio_thresholds
from tcpwatch.rules.shared import TIME_WAIT_SECONDS

# --- K06 -------------------------------------------------------------------------------------


def tw_buckets_default(sysctls: Sysctls) -> int | None:
    """The kernel's default tcp_max_tw_buckets for this namespace: half its ehash buckets.

    tcp_set_hashinfo() sets it to ehash entries / 2; ``tcp_ehash_entries`` (Linux 6.1+) shows
    the entries, negative when the namespace shares the host's table. None on older kernels.
    """
    entries = sysctls.get("net.ipv4.tcp_ehash_entries")
    if not entries:
        return None
    return abs(entries) // 2


@rule(
    "K06",
    "timewait-buckets",
    "warning",
    "TIME_WAIT sockets are limited by a lowered or nearly full tcp_max_tw_buckets",
    thresholds=(
        Threshold(
            "usage",
            0.9,
            0.01,
            1.0,
            "ratio",
            "warn when TIME_WAIT sockets reach this fraction of tcp_max_tw_buckets",
        ),
    ),
    sysctls=("net.ipv4.tcp_max_tw_buckets", "net.ipv4.tcp_ehash_entries"),
    counters=("TcpExtTCPTimeWaitOverflow",),
)
def K06(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = window.current.sysctls
    if sysctls is None:
        return
    limit = sysctls.get("net.ipv4.tcp_max_tw_buckets")
    if limit is None:
        return
    usage_threshold = required(thresholds, "usage")
    default = tw_buckets_default(sysctls)
    time_wait: int | None = None
    if window.current.sockstat is not None:
        time_wait = window.current.sockstat.time_wait
    elif window.current.sockets is not None:
        time_wait = window.current.sockets.total("time_wait")
    evidence: dict[str, EvidenceValue] = {"tcp_max_tw_buckets": limit}
    if default is not None:
        evidence["kernel_default"] = default
    problems: list[str] = []
    if default is not None and limit < default:
        problems.append(f"lowered from the kernel default {default}")
    if time_wait is not None:
        evidence["time_wait_sockets"] = time_wait
        usage = time_wait / limit if limit > 0 else (1.0 if time_wait else 0.0)
        evidence["usage_ratio"] = round(usage, 4)
        if time_wait > 0 and usage >= usage_threshold:
            problems.append(f"{time_wait} TIME_WAIT sockets use {usage:.0%} of it")
    overflows = add_counter(evidence, window, "TcpExtTCPTimeWaitOverflow")
    add_window(evidence, window)
    if overflows:
        problems.append(f"{overflows} TIME_WAIT sockets destroyed early during the window")
    if not problems:
        return
    evidence["problems"] = "; ".join(problems)
    netns = window.current.netns
    lines: list[str] = []
    if default is not None and limit < default:
        lines.append(
            sysctl_fix(netns, "net.ipv4.tcp_max_tw_buckets", default, window.persisted_sysctls)
        )
    elif time_wait is not None and limit > 0 and time_wait / limit >= usage_threshold:
        lines.append(
            "# many short connections: reuse them (HTTP keep-alive, connection pools) so fewer "
            f"end in TIME_WAIT, which always lasts {TIME_WAIT_SECONDS} s "
            "(tcp_fin_timeout does not shorten it)"
        )
        lines.append("# or raise the limit (each TIME_WAIT socket costs a few hundred bytes):")
        lines.append(
            sysctl_fix(netns, "net.ipv4.tcp_max_tw_buckets", limit * 2, window.persisted_sysctls)
        )
    else:
        lines.append(
            "# TIME_WAIT sockets were destroyed at the limit: raise it, and reuse connections"
        )
        lines.append(
            sysctl_fix(netns, "net.ipv4.tcp_max_tw_buckets", limit * 2, window.persisted_sysctls)
        )
    lines.append("# verify: " + run_in(netns, "cat /proc/net/sockstat") + " (TCP ... tw N)")
    yield K06.finding(
        window,
        "tcp_max_tw_buckets " + "; ".join(problems),
        evidence,
        "\n".join(lines),
    )


# --- K07 -------------------------------------------------------------------------------------


@rule(
    "K07",
    "orphans-near-limit",
    "warning",
    "Orphaned TCP sockets are approaching net.ipv4.tcp_max_orphans",
    thresholds=ratio_thresholds("orphans / tcp_max_orphans", warning=0.25, critical=0.5),
    sysctls=("net.ipv4.tcp_max_orphans",),
    counters=("TcpExtTCPAbortOnMemory",),
)
def K07(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = window.current.sysctls
    sockstat = window.current.sockstat
    if sysctls is None or sockstat is None:
        return
    limit = sysctls.get("net.ipv4.tcp_max_orphans")
    if limit is None or limit <= 0:
        return
    usage = sockstat.orphan / limit
    severity: Severity
    if usage >= required(thresholds, "critical"):
        severity = "critical"
    elif usage >= required(thresholds, "warning"):
        severity = "warning"
    else:
        return
    evidence: dict[str, EvidenceValue] = {
        "orphans": sockstat.orphan,
        "tcp_max_orphans": limit,
        "usage_ratio": round(usage, 4),
    }
    add_counter(evidence, window, "TcpExtTCPAbortOnMemory")
    netns = window.current.netns
    remediation = "\n".join(
        [
            "# find who closes connections that do not finish (FIN not acknowledged):",
            run_in(netns, "ss -tan state fin-wait-1 state last-ack state closing | head -50"),
            "# past the limit the kernel resets orphans; under memory pressure each counts 2-4x."
            " Raise the limit if memory allows (each orphan can hold up to ~64 KiB):",
            sysctl_fix(
                netns,
                "net.ipv4.tcp_max_orphans",
                limit * 2,
                window.persisted_sysctls,
                global_setting=True,
            ),
        ]
    )
    yield K07.finding(
        window,
        f"{sockstat.orphan} orphaned sockets: {usage:.0%} of tcp_max_orphans ({limit})",
        evidence,
        remediation,
        severity=severity,
    )


# --- K11 -------------------------------------------------------------------------------------


@rule(
    "K11",
    "tcp-memory-pressure",
    "warning",
    "TCP memory is above tcp_mem pressure, or close to its maximum",
    thresholds=(
        Threshold(
            "warning",
            1.0,
            0.1,
            1.0,
            "ratio",
            "warn when TCP memory exceeds this fraction of tcp_mem pressure",
        ),
        Threshold(
            "critical",
            0.9,
            0.1,
            1.0,
            "ratio",
            "critical when TCP memory reaches this fraction of tcp_mem max",
        ),
    ),
    sysctls=("net.ipv4.tcp_mem",),
    counters=("TcpExtTCPMemoryPressures",),
)
def K11(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
    sysctls = window.current.sysctls
    sockstat = window.current.sockstat
    if sysctls is None or sockstat is None:
        return
    pressure = sysctls.get("net.ipv4.tcp_mem", 1)
    maximum = sysctls.get("net.ipv4.tcp_mem", 2)
    if pressure is None or maximum is None or maximum <= 0:
        return
    pages = sockstat.memory_pages
    severity: Severity
    if pages >= required(thresholds, "critical") * maximum:
        severity = "critical"
    elif pages > required(thresholds, "warning") * pressure:
        severity = "warning"
    else:
        return
    evidence: dict[str, EvidenceValue] = {
        "memory_pages": pages,
        "tcp_mem_min": sysctls.get("net.ipv4.tcp_mem", 0) or 0,
        "tcp_mem_pressure": pressure,
        "tcp_mem_max": maximum,
        "usage_of_max_ratio": round(pages / maximum, 4),
    }
    add_counter(evidence, window, "TcpExtTCPMemoryPressures")
    netns = window.current.netns
    low = sysctls.get("net.ipv4.tcp_mem", 0) or 0
    remediation = "\n".join(
        [
            "# find the sockets holding memory: large Recv-Q (the application reads slowly)",
            run_in(netns, "ss -tn | sort -k2,2nr | head -20"),
            "# and large Send-Q (the peer reads slowly):",
            run_in(netns, "ss -tn | sort -k3,3nr | head -20"),
            "# if the load is legitimate and RAM allows, raise tcp_mem (pages):",
            sysctl_fix(
                netns,
                "net.ipv4.tcp_mem",
                f"{low * 2} {pressure * 2} {maximum * 2}",
                window.persisted_sysctls,
                global_setting=True,
            ),
        ]
    )
    title = (
        f"TCP memory {pages} pages is at {pages / maximum:.0%} of tcp_mem max ({maximum}): "
        "allocations will fail"
        if severity == "critical"
        else f"TCP memory {pages} pages is above the tcp_mem pressure threshold ({pressure}): "
        "the kernel is shrinking socket buffers"
    )
    yield K11.finding(window, title, evidence, remediation, severity=severity)
