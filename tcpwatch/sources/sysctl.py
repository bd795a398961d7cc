"""TCP tunables from /proc/sys/net/... (per network namespace for all but a few).

A sysctl the running kernel lacks (``tcp_tw_recycle`` since 4.12) is absent from the result;
a value we cannot parse raises :class:`~tcpwatch.sources.procnet.ProcParseError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from tcpwatch.model import Snapshot, Sysctls
from tcpwatch.paths import ProcPaths, read_text
from tcpwatch.sources.base import SourceContext, netns_source
from tcpwatch.sources.procnet import ProcParseError

_IPV4 = (
    "tcp_max_syn_backlog",
    "tcp_syncookies",
    "tcp_abort_on_overflow",
    "tcp_fin_timeout",
    "tcp_tw_reuse",
    "tcp_tw_recycle",
    "tcp_max_tw_buckets",
    "tcp_max_orphans",
    "ip_local_port_range",
    "tcp_keepalive_time",
    "tcp_keepalive_intvl",
    "tcp_keepalive_probes",
    "tcp_syn_retries",
    "tcp_synack_retries",
    "tcp_mem",
    "tcp_rmem",
    "tcp_wmem",
    "ip_unprivileged_port_start",
    # Read-only: hash buckets of this namespace's established table; negative when it shares
    # the host's (then every dump here walks the host's sockets too). Linux 6.1+.
    "tcp_ehash_entries",
    "tcp_child_ehash_entries",
)

SYSCTLS: tuple[str, ...] = (
    "net.core.somaxconn",
    "net.core.netdev_max_backlog",
    *(f"net.ipv4.{name}" for name in _IPV4),
)
# A comma-separated list of ports and ranges, not integers: read by read_sysctls on its own.
RESERVED_PORTS = "net.ipv4.ip_local_reserved_ports"

# Sysctls holding several integers, and what each field is called (metric label or suffix).
# Every other sysctl in SYSCTLS holds exactly one integer.
MULTI_FIELD_SUFFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "net.ipv4.ip_local_port_range": ("min", "max"),
        "net.ipv4.tcp_mem": ("min", "pressure", "max"),
        "net.ipv4.tcp_rmem": ("min", "default", "max"),
        "net.ipv4.tcp_wmem": ("min", "default", "max"),
    }
)


def parse_sysctl(name: str, text: str, path: str) -> tuple[int, ...]:
    """Parse a whitespace-separated integer sysctl value.

    ``net.ipv4.ip_local_port_range`` = "32768\\t60999\\n" -> (32768, 60999);
    ``net.core.somaxconn`` = "4096\\n" -> (4096,). The field count must match
    MULTI_FIELD_SUFFIXES (one field for names not listed there).
    """
    line = text.strip()
    expected = len(MULTI_FIELD_SUFFIXES.get(name, ("value",)))
    words = line.split()
    if len(words) != expected:
        plural = "s" if expected > 1 else ""
        raise ProcParseError(path, 1, line, f"expected {expected} integer{plural} for {name}")
    try:
        return tuple(int(word) for word in words)
    except ValueError:
        raise ProcParseError(path, 1, line, f"expected integers for {name}") from None


def parse_reserved_ports(text: str, path: str) -> tuple[tuple[int, int], ...]:
    """Parse ``ip_local_reserved_ports``: "8080,9000-9010\\n" -> ((8080, 8080), (9000, 9010)).

    An empty value (the default) gives ().
    """
    line = text.strip()
    if not line:
        return ()
    ranges: list[tuple[int, int]] = []
    for item in line.split(","):
        low_text, dash, high_text = item.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if dash else low
        except ValueError:
            raise ProcParseError(path, 1, line, f'expected a port or range, got "{item}"') from None
        if not 0 <= low <= high <= 65535:
            raise ProcParseError(path, 1, line, f'port range "{item}" out of order or bounds')
        ranges.append((low, high))
    return tuple(ranges)


def _read_optional(path: str) -> str | None:
    try:
        return read_text(path)
    except FileNotFoundError:
        return None


def read_sysctls(paths: ProcPaths, also: Iterable[str] = ()) -> Sysctls:
    """Every sysctl in SYSCTLS (and ``also``) that exists, plus the reserved ports (() when
    absent)."""
    values: dict[str, tuple[int, ...]] = {}
    # The reserved ports are a list of ranges, read below by their own parser.
    for name in dict.fromkeys(n for n in (*SYSCTLS, *also) if n != RESERVED_PORTS):
        path = paths.sysctl(name)
        text = _read_optional(path)
        if text is not None:
            values[name] = parse_sysctl(name, text, path)
    reserved_path = paths.sysctl(RESERVED_PORTS)
    reserved_text = _read_optional(reserved_path)
    reserved = () if reserved_text is None else parse_reserved_ports(reserved_text, reserved_path)
    return Sysctls(values=values, reserved_ports=reserved)


@netns_source("sysctl", field="sysctls", order=10)
def read_sysctl_source(context: SourceContext, so_far: Snapshot) -> Sysctls:
    """The tunables, and every sysctl a rule declared it reads."""
    return read_sysctls(context.paths, context.sysctl_names)
