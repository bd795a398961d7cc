"""Families of the ``sysctl`` source (TCP tunables under /proc/sys/net), and the page size that
is the unit of ``net.ipv4.tcp_mem``."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from tcpwatch.render.families.base import HOST, family, gauge, host_snapshot
from tcpwatch.state import ExportState


@family(source="sysctl", order=42)
def page_size_family(state: ExportState) -> Iterator[Metric]:
    # tcp_mem and sockstat's mem are in pages: 4 KiB on x86-64, 16 or 64 KiB on some arm64 and
    # ppc64 kernels, so a dashboard multiplying by 4096 is wrong there.
    page = GaugeMetricFamily(
        "tcpwatch_page_size_bytes",
        "The kernel's page size (sysconf PAGE_SIZE): the unit of net.ipv4.tcp_mem.",
    )
    page.add_metric([], os.sysconf("SC_PAGE_SIZE"))
    yield page


@family(source="sysctl", order=43)
def sysctl_family(state: ExportState) -> Iterator[Metric]:
    sysctls = gauge(
        "tcpwatch_sysctl",
        "TCP tunables under /proc/sys/net. Multi-valued ones get one series per field, named "
        "with a suffix (net.ipv4.ip_local_port_range.min/.max, "
        "net.ipv4.tcp_mem.min/.pressure/.max). Beside the host's namespace, another namespace "
        "has only the tunables whose value differs from the host's.",
        ["netns", "name"],
        state,
    )
    host = host_snapshot(state)
    reference = dict(host.sysctls.named_fields()) if host and host.sysctls else {}
    for snap in state.snapshots:
        if snap.sysctls is not None:
            same = reference if snap.netns != HOST else {}
            for name, value in snap.sysctls.named_fields():
                if same.get(name) != value:
                    sysctls.add_metric([snap.netns, name], value)
    yield sysctls
