"""Families of the ``sockstat`` source (/proc/net/sockstat and sockstat6)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.render.families.base import NETNS, family, gauge
from tcpwatch.state import ExportState


@family(source="sockstat", order=41)
def sockstat_families(state: ExportState) -> Iterator[Metric]:
    orphans = gauge(
        "tcpwatch_orphan_sockets",
        "TCP sockets closed by their application but not yet finished (/proc/net/sockstat orphan).",
        NETNS,
        state,
    )
    memory = gauge(
        "tcpwatch_tcp_memory_bytes",
        "Memory the kernel accounts to TCP sockets (/proc/net/sockstat mem, pages x page size); "
        "compare with net.ipv4.tcp_mem, which is in pages.",
        NETNS,
        state,
    )
    page_size = os.sysconf("SC_PAGE_SIZE")
    for snap in state.snapshots:
        if snap.sockstat is not None:
            orphans.add_metric([snap.netns], snap.sockstat.orphan)
            memory.add_metric([snap.netns], snap.sockstat.memory_pages * page_size)
    yield from (orphans, memory)
