"""Prometheus exposition of the latest snapshots and findings (a custom collector).

collect() builds every family afresh from an immutable ExportState, so a scrape never sees half a
poll and no labelled series outlives the socket or finding it described. The families are the
ones the modules of ``tcpwatch/render/families/`` declare, one module per source, in their
declared order: this module keeps no list of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tcpwatch import __version__
from tcpwatch.render.families.base import Family
from tcpwatch.render.families.registry import registered_families
from tcpwatch.state import ExportState


def build_info() -> Metric:
    """The collector's own series, there before the first poll too."""
    info = GaugeMetricFamily(
        "tcpwatch_build_info", "tcpwatch version; always 1.", labels=["version"]
    )
    info.add_metric([__version__], 1)
    return info


class TcpwatchCollector(Collector):
    def __init__(
        self,
        state: Callable[[], ExportState | None],
        families: Sequence[Family] | None = None,
    ) -> None:
        self._state = state
        # Found once: the package does not change while it runs.
        self._families = registered_families() if families is None else tuple(families)

    def describe(self) -> list[Metric]:
        # Describing nothing keeps registration from calling collect() (and so from polling).
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield build_info()
        if state is None:
            return
        for declared in self._families:
            yield from declared.render(state)


def make_registry(
    state: Callable[[], ExportState | None], include_process: bool = True
) -> CollectorRegistry:
    """A private registry: tcpwatch's collector plus the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TcpwatchCollector(state))
    if include_process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def render(state: ExportState, include_process: bool = True) -> bytes:
    return generate_latest(make_registry(lambda: state, include_process))
