"""Families of the polled namespaces: entering each one is the pipeline's ``netns`` step, and
its identity (container, pod) comes from discovery."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from tcpwatch.render.families.base import family, gauge
from tcpwatch.state import ExportState


@family(source="netns", order=10)
def netns_families(state: ExportState) -> Iterator[Metric]:
    info = gauge(
        "tcpwatch_netns_info",
        "1 for each polled network namespace; container, pod, pod_namespace and pod_uid name who "
        "lives there when a member process' cgroup tells (empty otherwise). Join on netns.",
        ["netns", "inode", "container", "pod", "pod_namespace", "pod_uid"],
        state,
    )
    for snap in state.snapshots:
        identity = snap.identity
        info.add_metric(
            [
                snap.netns,
                str(identity.inode) if identity.inode else "",
                identity.container,
                identity.pod,
                identity.pod_namespace,
                identity.pod_uid,
            ],
            1,
        )
    polled = GaugeMetricFamily(
        "tcpwatch_netns_polled", "Network namespaces polled in the latest poll."
    )
    polled.add_metric([], len(state.snapshots))
    yield from (info, polled)
