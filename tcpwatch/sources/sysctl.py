"""TCP tunables from /proc/sys/net/... (per network namespace for all but a few).

A sysctl the running kernel lacks (``tcp_tw_recycle`` since 4.12) is absent from the result; a
file we cannot read or parse is left out too, and named: the source is then degraded, not down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from tcpwatch.errors import describe_error
from tcpwatch.model import MULTI_FIELD_SUFFIXES, Snapshot, Sysctls
from tcpwatch.paths import ProcPaths, read_small_text
from tcpwatch.sources.base import FileMemo, Partial, SourceContext, netns_source
from tcpwatch.sources.heldfiles import HeldFiles
from tcpwatch.sources.procnet import ProcParseError

_T = TypeVar("_T")
_MAX_SYSCTL_CHARS = 4096  # a sysctl value is a line; a fixture tree could hold anything


class NoSysctls(Exception):
    """The sysctl source could use no file at all: it failed, it is not up."""


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
PORT_RANGE = "net.ipv4.ip_local_port_range"
# A comma-separated list of ports and ranges, not integers: read by read_sysctls on its own.
RESERVED_PORTS = "net.ipv4.ip_local_reserved_ports"


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
        fields = tuple(int(word) for word in words)
    except ValueError:
        raise ProcParseError(path, 1, line, f"expected integers for {name}") from None
    if name == PORT_RANGE and not 0 <= fields[0] <= fields[1] <= 65535:
        raise ProcParseError(path, 1, line, "expected two ports, the lower first")
    return fields


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


@dataclass(frozen=True, slots=True)
class SysctlRead:
    """What one read of the sysctl files gave, and the files it had to leave out."""

    sysctls: Sysctls
    skipped: tuple[str, ...]  # "path: why", one per file that exists but could not be used


# One sysctl file as read: its name, path, text (None: absent, the kernel lacks it) and, when
# reading it failed otherwise, why.
_Read = tuple[str, str, str | None, str | None]


def _files(wanted: tuple[ProcPaths, tuple[str, ...]]) -> tuple[tuple[str, str], ...]:
    """Each sysctl's name and path: SYSCTLS and ``also``, the reserved ports (read by their own
    parser) last."""
    paths, also = wanted
    names = [*dict.fromkeys(n for n in (*SYSCTLS, *also) if n != RESERVED_PORTS), RESERVED_PORTS]
    return tuple((name, paths.sysctl(name)) for name in names)


def _read_texts(
    files: tuple[tuple[str, str], ...], held: HeldFiles | None, netns: int
) -> tuple[_Read, ...]:
    read: list[_Read] = []
    for name, path in files:
        try:
            if held is not None:
                text = held.read(netns, path, _MAX_SYSCTL_CHARS)
            else:
                text = read_small_text(path, _MAX_SYSCTL_CHARS)
            read.append((name, path, text, None))
        except FileNotFoundError:
            read.append((name, path, None, None))
        except (OSError, UnicodeDecodeError) as error:
            read.append((name, path, None, _skip_note(path, error)))
    return tuple(read)


def _parsed(texts: tuple[_Read, ...]) -> SysctlRead:
    values: dict[str, tuple[int, ...]] = {}
    skipped: list[str] = []
    reserved: tuple[tuple[int, int], ...] = ()
    known = True
    for name, path, text, problem in texts:
        try:
            if problem is not None:
                raise _Unreadable(problem)
            if text is None:
                continue
            if name == RESERVED_PORTS:
                reserved = parse_reserved_ports(text, path)
            else:
                values[name] = parse_sysctl(name, text, path)
        except (_Unreadable, ProcParseError) as error:
            skipped.append(str(error))
            if name == RESERVED_PORTS:
                # Unknown, not empty: a fix written from an empty list would drop every
                # reservation.
                known = False
    sysctls = Sysctls(values=values, reserved_ports=reserved, reserved_ports_known=known)
    return SysctlRead(sysctls, tuple(skipped))


class _Unreadable(Exception):
    """A sysctl file that exists but could not be read (its note is the message)."""


def read_sysctl_files(
    paths: ProcPaths, also: Iterable[str] = (), memo: FileMemo | None = None, netns: int = 0
) -> SysctlRead:
    """Every sysctl in SYSCTLS (and ``also``) that exists, plus the reserved ports.

    One file is one field: a malformed or unreadable file is left out and named in ``skipped``,
    the others are kept (a bad value must not take every tcpwatch_sysctl series with it). Every
    file is read on every call (procfs gives no modification time); with ``memo``, from
    descriptors held open between calls (heldfiles.py), and texts equal to the namespace's last
    ones are not parsed again and give the same Sysctls object.
    """
    wanted = (paths, tuple(also))
    if memo is None:
        return _parsed(_read_texts(_files(wanted), None, netns))
    # The paths are built once (a sixth of the reads' cost); a namespace's inode keys its held
    # descriptors: unknown (0), every file is opened.
    files = memo.parsed((netns, "sysctl paths"), wanted, _files)
    texts = _read_texts(files, memo.held if netns else None, netns)
    return memo.parsed((netns, "sysctl"), texts, _parsed)


def _skip_note(path: str, error: Exception) -> str:
    if isinstance(error, ProcParseError):
        return str(error)
    return f"{path}: {describe_error(error)}"


def read_sysctls(paths: ProcPaths, also: Iterable[str] = ()) -> Sysctls:
    """The sysctls :func:`read_sysctl_files` could use (benchmarks and tests want only these)."""
    return read_sysctl_files(paths, also).sysctls


@netns_source("sysctl", field="sysctls", order=10)
def read_sysctl_source(context: SourceContext, so_far: Snapshot) -> Sysctls | Partial:
    """The tunables, and every sysctl a rule declared it reads.

    Degraded (up, with notes) when some files could not be used; failed when none could: a
    source that read nothing is not up (procfs gone or not mounted where --path.procfs says).
    """
    read = read_sysctl_files(context.paths, context.sysctl_names, context.memo, context.netns_inode)
    if not read.sysctls.values:
        if read.skipped:
            raise NoSysctls(f"no sysctl file was usable, e.g. {read.skipped[0]}")
        raise NoSysctls(f"no TCP sysctl under {context.paths.sysctl('net')} (is it procfs?)")
    if read.skipped:
        return Partial(read.sysctls, read.skipped)
    return read.sysctls
