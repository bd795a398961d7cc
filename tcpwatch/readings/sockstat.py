"""What the sockstat source read: /proc/net/sockstat (the snapshot's ``sockstat``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SockStat:
    """/proc/net/sockstat and sockstat6, TCP lines."""

    inuse_ipv4: int  # full TCP sockets in the hash tables (no TIME_WAIT, no request sockets)
    inuse_ipv6: int
    orphan: int
    time_wait: int  # both families; FIN_WAIT2 timewait sockets included
    alloc: int
    memory_pages: int
