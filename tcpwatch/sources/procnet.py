"""Kernel counters from /proc/net/{netstat,snmp} and socket totals from /proc/net/sockstat{,6}.

Everything here is per network namespace when read through ``/proc/net`` (or
``/proc/thread-self/net`` after setns()). The parsers are pure functions of the file text;
``read_*`` do the I/O through :class:`~tcpwatch.paths.ProcPaths`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tcpwatch.model import KernelCounters, Snapshot, SockStat
from tcpwatch.paths import ProcPaths, read_text
from tcpwatch.sources.base import FileMemo, SourceContext, netns_source

# Offending text longer than this is cut in the message (a netstat line runs to ~2,000 chars).
_MAX_SHOWN = 120


class ProcParseError(Exception):
    """A /proc file did not have the expected shape.

    ``line`` is 1-based; ``text`` is the offending line ("" when a line is missing), e.g.
    ``/proc/net/netstat:4: expected as many values as names in "TcpExt: 1 2"``.
    """

    def __init__(self, path: str, line: int, text: str, reason: str) -> None:
        super().__init__(path, line, text, reason)
        self.path = path
        self.line = line
        self.text = text
        self.reason = reason

    def __str__(self) -> str:
        message = f"{self.path}:{self.line}: {self.reason}"
        if not self.text:
            return message
        shown = self.text if len(self.text) <= _MAX_SHOWN else self.text[:_MAX_SHOWN] + "..."
        return f'{message} in "{shown}"'


def parse_counter_table(text: str, path: str) -> dict[str, int]:
    """Parse the header-line/value-line pairs of /proc/net/netstat and /proc/net/snmp.

    Each pair shares a prefix; keys are prefix + field, as ``nstat`` names them::

        TcpExt: SyncookiesSent ListenOverflows        -> TcpExtSyncookiesSent = 0
        TcpExt: 0 3                                      TcpExtListenOverflows = 3
        Tcp: RtoAlgorithm MaxConn CurrEstab           -> TcpRtoAlgorithm = 1
        Tcp: 1 -1 2                                      TcpMaxConn = -1, TcpCurrEstab = 2

    Values stay signed (``Tcp: MaxConn`` is -1). Anything else raises :class:`ProcParseError`.
    """
    lines = text.splitlines()
    if not lines:
        raise ProcParseError(path, 1, "", "empty file")
    counters: dict[str, int] = {}
    for index in range(0, len(lines), 2):
        header = lines[index]
        prefix, separator, names_text = header.partition(":")
        if not separator or not prefix or " " in prefix:
            raise ProcParseError(path, index + 1, header, 'expected a "Prefix: names" line')
        if index + 1 == len(lines):
            raise ProcParseError(path, index + 2, "", f'missing the value line after "{prefix}:"')
        value_line = lines[index + 1]
        value_prefix, separator, values_text = value_line.partition(":")
        if not separator or value_prefix != prefix:
            raise ProcParseError(path, index + 2, value_line, f'expected a "{prefix}:" value line')
        names = names_text.split()
        values = values_text.split()
        if not all(name[0].isalpha() for name in names):
            raise ProcParseError(path, index + 1, header, "expected counter names")
        if len(names) != len(values):
            raise ProcParseError(path, index + 2, value_line, "expected as many values as names")
        try:
            for name, value in zip(names, values, strict=True):
                counters[prefix + name] = int(value)
        except ValueError:
            raise ProcParseError(path, index + 2, value_line, "expected integer values") from None
    return counters


def _tcp_fields(text: str, path: str, tag: str, keys: tuple[str, ...]) -> tuple[int, ...]:
    """Values of ``keys`` on the line starting with ``tag`` (``TCP:`` or ``TCP6:``)."""
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.startswith(tag):
            continue
        words = line[len(tag) :].split()
        if len(words) % 2:
            raise ProcParseError(path, number, line, "expected key/value pairs")
        fields = dict(zip(words[::2], words[1::2], strict=True))
        missing = [key for key in keys if key not in fields]
        if missing:
            raise ProcParseError(path, number, line, f"missing {', '.join(missing)}")
        try:
            return tuple(int(fields[key]) for key in keys)
        except ValueError:
            raise ProcParseError(path, number, line, "expected integer values") from None
    raise ProcParseError(path, len(lines) + 1, "", f'no "{tag}" line')


def parse_sockstat(text4: str, text6: str | None, path: str, path6: str | None = None) -> SockStat:
    """Parse the TCP lines of /proc/net/sockstat and /proc/net/sockstat6.

    ``text6`` is None when sockstat6 does not exist (a kernel without IPv6): inuse_ipv6 is 0::

        sockets: used 12
        TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 165     (sockstat)
        TCP6: inuse 3                                  (sockstat6)
        -> SockStat(inuse_ipv4=5, inuse_ipv6=3, orphan=0, time_wait=2, alloc=7, memory_pages=165)

    ``path6`` names sockstat6 in errors; by default ``path`` + "6".
    """
    path6 = path + "6" if path6 is None else path6
    inuse, orphan, time_wait, alloc, memory = _tcp_fields(
        text4, path, "TCP:", ("inuse", "orphan", "tw", "alloc", "mem")
    )
    inuse_ipv6 = 0 if text6 is None else _tcp_fields(text6, path6, "TCP6:", ("inuse",))[0]
    return SockStat(
        inuse_ipv4=inuse,
        inuse_ipv6=inuse_ipv6,
        orphan=orphan,
        time_wait=time_wait,
        alloc=alloc,
        memory_pages=memory,
    )


# Tcp MIB fields that move whenever a connection opens (ActiveOpens: tcp_connect; PassiveOpens:
# tcp_create_openreq_child), fails (AttemptFails), is reset (EstabResets) or enters or leaves
# ESTABLISHED in net (CurrEstab, a gauge); docs/kernel-facts.md has the sources.
CHURN_FIELDS = ("TcpActiveOpens", "TcpPassiveOpens", "TcpAttemptFails", "TcpEstabResets",
                "TcpCurrEstab")  # fmt: skip


# Tcp MIB fields that move with every segment into or out of net: with the above and sockstat's
# per-namespace inuse and tw they make a namespace's quiet marks (ChurnMarks.quiet).
QUIET_FIELDS = ("TcpInSegs", "TcpOutSegs", "TcpRetransSegs", "TcpInErrs", "TcpOutRsts")


@dataclass(frozen=True, slots=True)
class ChurnMarks:
    """What tells whether a namespace's full sockets changed between two reads: the Tcp MIB
    fields above and sockstat's ``inuse`` per family. Equal marks before and after a dump mean no
    connection was opened, failed, reset or established in net, and (every rise of ``inuse``
    but listen() coming with an open) none was destroyed either.

    ``quiet`` adds QUIET_FIELDS and sockstat's ``tw`` (not compared by ``==``): equal
    ``signature``s at two moments mean no segment came or went in net and no timewait socket
    came or expired, so no socket changed state in between but by a timer that sends nothing
    (sockets.py says which, and when it reuses a table for it)."""

    tcp: tuple[int, ...]
    inuse_ipv4: int
    inuse_ipv6: int
    quiet: tuple[int, ...] = field(default=(), compare=False)

    @property
    def signature(self) -> tuple[int, ...]:
        return (*self.tcp, self.inuse_ipv4, self.inuse_ipv6, *self.quiet)


def parse_churn_fields(text: str, path: str) -> tuple[int, ...]:
    """The CHURN_FIELDS of /proc/net/snmp, in that order; ProcParseError if one is missing."""
    return _fields(parse_counter_table(text, path), CHURN_FIELDS, path)


def _fields(values: Mapping[str, int], names: tuple[str, ...], path: str) -> tuple[int, ...]:
    missing = [name for name in names if name not in values]
    if missing:
        raise ProcParseError(path, 1, "", f"missing {', '.join(missing)}")
    return tuple(values[name] for name in names)


# Longer than any of these tables is today (netstat ~4 KB): a text that fills it is read again
# whole, not cut.
_HELD_LIMIT = 1 << 16


def _net_text(path: str, memo: FileMemo | None, netns: int) -> str:
    """The text of a /proc/net table, with ``memo`` from a descriptor held open between polls.

    A held /proc/net file is rendered afresh by each pread at offset 0 (seq_read_iter starts
    over at 0). Unlike /proc/sys, its open takes a reference on the namespace
    (fs/proc/proc_net.c, ``single_open_net``: ``maybe_get_net`` until release): a held
    descriptor keeps a deleted namespace alive, so they are closed with the namespace's other
    held files at the end of the first poll that did not poll it (HeldFiles.end_poll), as the
    destroy listener's socket is retired (docs/performance.md has the test)."""
    if memo is None or not netns:
        return read_text(path)
    text = memo.held.read(netns, path, _HELD_LIMIT)
    return text if len(text) < _HELD_LIMIT else read_text(path)


def _table(paths: ProcPaths, name: str, memo: FileMemo | None, netns: int) -> dict[str, int]:
    """/proc/net/<name> parsed (by ``memo`` only when its text changed since the last poll)."""
    path = paths.net(name)
    text = _net_text(path, memo, netns)
    if memo is None:
        return parse_counter_table(text, path)
    return memo.parsed((netns, path), text, lambda t: parse_counter_table(t, path))


def read_churn_marks(
    paths: ProcPaths, after: bool = False, memo: FileMemo | None = None, netns: int = 0
) -> ChurnMarks:
    """The marks, read so that an open straddling the read is seen: before a dump the MIB
    first (a connect() is hashed, so in ``inuse``, before ActiveOpens moves), after it sockstat
    first (an accepted child's PassiveOpens moves before it is hashed)."""
    snmp = paths.net("snmp")
    if after:
        sockstat = read_sockstat(paths, memo, netns)
        values = _table(paths, "snmp", memo, netns)
    else:
        values = _table(paths, "snmp", memo, netns)
        sockstat = read_sockstat(paths, memo, netns)
    quiet = (*_fields(values, QUIET_FIELDS, snmp), sockstat.time_wait)
    return ChurnMarks(
        _fields(values, CHURN_FIELDS, snmp), sockstat.inuse_ipv4, sockstat.inuse_ipv6, quiet
    )


def marks_of(counters: KernelCounters, sockstat: SockStat, path: str) -> ChurnMarks:
    """The marks from tables already read, the MIB (``counters``) before ``sockstat``: as
    :func:`read_churn_marks` reads them before a dump. ``path`` names snmp in errors."""
    values = counters.values
    quiet = (*_fields(values, QUIET_FIELDS, path), sockstat.time_wait)
    return ChurnMarks(
        _fields(values, CHURN_FIELDS, path), sockstat.inuse_ipv4, sockstat.inuse_ipv6, quiet
    )


def marks_before_dump(context: SourceContext, so_far: Snapshot) -> ChurnMarks:
    """The marks before this poll's dump: from the counters and sockstat sources' reads when
    both worked this poll (the counters source runs first, so the MIB was read before
    ``inuse``, and nothing in the namespace is read between them and the dump); else read now.

    One read then serves both a table and the marks (snmp and sockstat were read twice a
    poll). The reads are further apart than read_churn_marks' two, which only widens what
    the marks compare: an open whose MIB counter moves after the MIB read still shows at the
    end, and a PassiveOpens that straddles both reads needs longer than the gap
    (docs/kernel-facts.md)."""
    if so_far.counters is not None and so_far.sockstat is not None:  # both read this poll
        return marks_of(so_far.counters, so_far.sockstat, context.paths.net("snmp"))
    return read_churn_marks(context.paths, False, context.memo, context.netns_inode)


def read_counters(paths: ProcPaths, memo: FileMemo | None = None, netns: int = 0) -> KernelCounters:
    """/proc/net/netstat and /proc/net/snmp merged; OSError (with the path) if either is missing."""
    values: dict[str, int] = {}
    for name in ("netstat", "snmp"):
        values.update(_table(paths, name, memo, netns))
    return KernelCounters(values=values)


def read_sockstat(paths: ProcPaths, memo: FileMemo | None = None, netns: int = 0) -> SockStat:
    """/proc/net/sockstat and, when IPv6 exists, /proc/net/sockstat6."""
    path = paths.net("sockstat")
    path6 = paths.net("sockstat6")
    text4 = _net_text(path, memo, netns)
    try:
        text6: str | None = _net_text(path6, memo, netns)
    except FileNotFoundError:
        text6 = None
    return parse_sockstat(text4, text6, path, path6)


# sockstat is read right before the socket dump: inbound ESTABLISHED is derived from its inuse,
# and after counters, so that the two make the churn marks before the dump (marks_before_dump).
@netns_source("sockstat", field="sockstat", order=20)
def read_sockstat_source(context: SourceContext, so_far: Snapshot) -> SockStat:
    return read_sockstat(context.paths, context.memo, context.netns_inode)


@netns_source("counters", field="counters", order=15)
def read_counters_source(context: SourceContext, so_far: Snapshot) -> KernelCounters:
    return read_counters(context.paths, context.memo, context.netns_inode)
