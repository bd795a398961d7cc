"""Families of the ``sockstat`` source (/proc/net/sockstat and sockstat6)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client.core import Metric

from tcpwatch.render.families.base import HOST, NETNS, family, gauge, host_snapshot
from tcpwatch.state import ExportState


@family(source="sockstat", order=41)
def sockstat_families(state: ExportState) -> Iterator[Metric]:
    # The kernel keeps one count of each for the whole host: beside the host's namespace,
    # another one would only repeat it.
    orphans = gauge(
        "tcpwatch_orphan_sockets",
        "TCP sockets closed by their application but not yet finished (/proc/net/sockstat orphan; "
        "one count for the whole host, on the host's namespace when it is polled).",
        NETNS,
        state,
    )
    memory = gauge(
        "tcpwatch_tcp_memory_bytes",
        "Memory the kernel accounts to TCP sockets (/proc/net/sockstat mem, pages x page size); "
        "compare with net.ipv4.tcp_mem, which is in pages. One count for the whole host, on the "
        "host's namespace when it is polled.",
        NETNS,
        state,
    )
    page_size = os.sysconf("SC_PAGE_SIZE")
    host = host_snapshot(state)
    for snap in state.snapshots:
        if host is not None and host.sockstat is not None and snap.netns != HOST:
            continue
        if snap.sockstat is not None:
            orphans.add_metric([snap.netns], snap.sockstat.orphan)
            memory.add_metric([snap.netns], snap.sockstat.memory_pages * page_size)
    yield from (orphans, memory)
