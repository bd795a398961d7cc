"""The metric-family registry: derived from the declarations in tcpwatch/render/families/,
checked against the source registry, in exposition order."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from tcpwatch.render.families.base import PIPELINE, Family, NoFamilies, family
from tcpwatch.render.families.registry import (
    FamilyRegistryError,
    declared_in,
    registered,
    registered_families,
    uncovered,
)
from tcpwatch.render.prometheus import TcpwatchCollector
from tcpwatch.sources.registry import ENTERING, registered_sources
from tcpwatch.state import ExportState


def module(name: str, **values: object) -> types.ModuleType:
    made = types.ModuleType(f"tcpwatch.render.families.{name}")
    for key, value in values.items():
        setattr(made, key, value)
    return made


def one(name: str) -> Family:
    def render(state: ExportState) -> Iterator[Metric]:
        metric = GaugeMetricFamily(name, "A test family.")
        metric.add_metric([], len(state.snapshots))
        yield metric

    render.__name__ = name
    return family(source="toy", order=5)(render)


def package_sources() -> list[tuple[str, str | None]]:
    return [(ENTERING, None), *((source.name, source.field) for source in registered_sources())]


def test_every_family_renders_a_source_and_every_source_with_a_field_is_exported_or_says_why() -> (
    None
):
    assert uncovered(registered(), package_sources()) == []
    exported = {declared.source for declared in registered_families()}
    assert {"sysctl", "sockstat", "counters", "sockdiag", "processes", "owners"} <= exported
    assert PIPELINE in exported
    assert [entry.source for entry in registered().unexported] == ["sysctl_files"]


def test_a_source_with_a_field_and_no_family_module_is_reported() -> None:
    declared = declared_in([])
    assert uncovered(declared, [("toy", "toy"), ("quiet", None)]) == [
        "source 'toy' fills Snapshot.toy but has no tcpwatch/render/families/toy.py declaring "
        "its families (or NoFamilies)"
    ]
    said = declared_in([module("toy", NONE=NoFamilies("toy", "rules only"))])
    assert uncovered(said, [("toy", "toy")]) == []


def test_a_family_of_no_registered_source_is_reported() -> None:
    declared = declared_in([module("toy", gauge=one("tcpwatch_toy"))])
    (problem,) = uncovered(declared, [("sysctl", None)])
    assert "renders 'toy', which is no registered source" in problem


def test_a_family_declared_outside_its_sources_module_is_refused() -> None:
    with pytest.raises(FamilyRegistryError, match=r"belong in tcpwatch/render/families/toy\.py"):
        declared_in([module("sockstat", gauge=one("tcpwatch_toy"))])


def test_a_source_both_exported_and_not_is_refused() -> None:
    with pytest.raises(FamilyRegistryError, match="with families and without"):
        declared_in([module("toy", gauge=one("tcpwatch_toy"), NONE=NoFamilies("toy", "why"))])


def test_order_then_source_then_name_decides_the_exposition_order() -> None:
    late = family(source="toy", order=9)(one("tcpwatch_b").render)
    early = family(source="toy", order=1)(one("tcpwatch_c").render)
    declared = declared_in([module("toy", late=late, early=early, middle=one("tcpwatch_a"))])
    assert [entry.order for entry in declared.families] == [1, 5, 9]
    state = ExportState(snapshots=(), findings=(), last_poll=0.0)
    collector = TcpwatchCollector(lambda: state, declared.families)
    names = [metric.name for metric in collector.collect()]
    assert names == ["tcpwatch_build_info", "tcpwatch_c", "tcpwatch_a", "tcpwatch_b"]


def test_no_two_families_expose_one_metric_name() -> None:
    state = ExportState(snapshots=(), findings=(), last_poll=0.0)
    names = [metric.name for declared in registered_families() for metric in declared.render(state)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
