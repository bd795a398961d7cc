"""What the counters source read: the kernel's TCP counters (the snapshot's ``counters``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KernelCounters:
    """/proc/net/netstat and /proc/net/snmp counters, with nstat names (TcpExtListenOverflows)."""

    values: Mapping[str, int]

    def get(self, name: str) -> int | None:
        return self.values.get(name)
