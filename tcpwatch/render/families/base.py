"""What every family module shares: the declaration, and the pieces of help text and labels.

A family is declared where it is written, on the function that renders it from the state::

    @family(source="sockstat", order=41)
    def sockstat_families(state: ExportState) -> Iterator[Metric]: ...

``source`` names the registered source whose value it renders (:data:`PIPELINE` for the
pipeline's own state); ``order`` places its metrics in the exposition, lower first. A registered
source with a Snapshot field but nothing to export says so with :class:`NoFamilies` in its
module. The registry (``tcpwatch.render.families.registry``) collects both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tcpwatch.model import Snapshot
from tcpwatch.state import ExportState

# Families of what the pipeline keeps itself, not of one source.
PIPELINE = "pipeline"

# The HELP suffix of every family whose values a scrape takes from the latest poll (serve).
CACHED = " Cached: values are from the latest poll (see tcpwatch_last_poll_timestamp_seconds)."
NETNS = ["netns"]  # the label of a family with one series per namespace
HOST = "host"  # the name of the init network namespace (sources/netns/naming.py)

Render = Callable[[ExportState], Iterable[Metric]]


@dataclass(frozen=True, slots=True)
class Family:
    """Metric families rendered by one function from the state."""

    name: str  # module.function, for messages
    source: str  # the registered source it renders, or PIPELINE
    order: int
    render: Render


@dataclass(frozen=True, slots=True)
class NoFamilies:
    """A registered source whose value fills the snapshot for the rules only, and why."""

    source: str
    why: str


def family(*, source: str, order: int) -> Callable[[Render], Family]:
    """Declare a function ``(ExportState) -> metric families`` as part of the exposition."""

    def declare(render: Render) -> Family:
        return Family(
            f"{render.__module__}.{getattr(render, '__name__', '?')}", source, order, render
        )

    return declare


def cached(state: ExportState) -> str:
    """The HELP suffix for values from the latest poll, when the state is served between polls."""
    return CACHED if state.cached else ""


def host_snapshot(state: ExportState) -> Snapshot | None:
    """The host's namespace when this poll covers it and others.

    A namespace beside it leaves out what the host's own series already say (docs/metrics.md,
    "Series arithmetic"): sysctls equal to the host's, the kernel's host-wide counts, the health
    of host-wide sources. With the host alone, or without it, every namespace has everything.
    """
    if len(state.snapshots) < 2:
        return None
    return next((snap for snap in state.snapshots if snap.netns == HOST), None)


def gauge(name: str, doc: str, labels: list[str], state: ExportState) -> GaugeMetricFamily:
    """A gauge of values from the latest poll (its HELP says so when served between polls)."""
    return GaugeMetricFamily(name, doc + cached(state), labels=labels)


def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def kernel_counters(
    table: tuple[tuple[str, str, str], ...], state: ExportState
) -> Iterator[Metric]:
    """One counter per (nstat name, exported name, help) of ``table``, per namespace whose
    counters source worked and has that counter."""
    families = {name: counter(name, doc, NETNS) for _, name, doc in table}
    for snap in state.snapshots:
        if snap.counters is None:
            continue
        for nstat_name, name, _ in table:
            value = snap.counters.get(nstat_name)
            if value is not None:
                families[name].add_metric([snap.netns], value)
    yield from families.values()
