"""The source registry: derived from the declarations, checked, in poll order."""

from __future__ import annotations

import dataclasses
import types

import pytest

from tcpwatch.model import Snapshot
from tcpwatch.sources.base import Source, SourceContext, host_source, netns_source
from tcpwatch.sources.registry import (
    ENTERING,
    RegistryError,
    declared_in,
    registered_sources,
    source_names,
)


def module(**values: object) -> types.ModuleType:
    made = types.ModuleType("declared")
    for name, value in values.items():
        setattr(made, name, value)
    return made


def reader(context: SourceContext, so_far: Snapshot) -> int:
    return 1


def test_entering_comes_first_and_reads_that_depend_on_each_other_stay_in_order() -> None:
    names = source_names()
    assert names[0] == ENTERING and len(names) == len(set(names))
    # The tunables and sockstat before the dump that uses them (port range; the inuse count it
    # is compared with); the dump before the listener of closed connections (it is told this
    # poll's listeners), the fd walk (it attributes the dumped inodes) and the owners described
    # from that walk. A new source may go anywhere its needs allow.
    order = [name for name in names if name in ("sysctl", "sockstat", "sockdiag", "lifecycle")]
    assert order == ["sysctl", "sockstat", "sockdiag", "lifecycle"]
    # The counters' snmp read is the MIB half of the churn marks before the dump, so it must
    # come before sockstat's inuse (procnet.marks_before_dump, docs/kernel-facts.md).
    assert names.index("counters") < names.index("sockstat")
    assert names.index("sockdiag") < names.index("processes") < names.index("owners")


def test_every_source_fills_a_snapshot_field_that_exists() -> None:
    fields = {field.name for field in dataclasses.fields(Snapshot)}
    for source in registered_sources():
        assert source.field is None or source.field in fields, source.name


def test_a_source_placed_before_what_it_needs_is_refused() -> None:
    early = netns_source("early", field=None, order=1, needs=("late",))(reader)
    late = netns_source("late", field=None, order=2)(reader)
    with pytest.raises(RegistryError, match="'early' needs 'late'"):
        declared_in([module(early=early, late=late)])


def test_two_sources_with_one_name_are_refused() -> None:
    one = netns_source("same", field=None, order=1)(reader)
    other = netns_source("same", field=None, order=2)(reader)
    with pytest.raises(RegistryError, match="two sources are named 'same'"):
        declared_in([module(one=one, other=other)])


def test_order_then_name_decides_and_host_sources_take_every_snapshot() -> None:
    b = netns_source("b", field=None, order=5)(reader)
    a = netns_source("a", field=None, order=5)(reader)
    first = netns_source("z", field=None, order=1)(reader)
    everyone = host_source("all", field=None, order=9, needs=("a",))(lambda c, s: len(s))
    ordered = declared_in([module(b=b, a=a, first=first, everyone=everyone)])
    assert [source.name for source in ordered] == ["z", "a", "b", "all"]
    assert isinstance(everyone, Source) and everyone.scope == "host"


def test_an_extra_module_that_cannot_be_imported_is_one_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tcpwatch.errors import UsageError
    from tcpwatch.sources.registry import EXTRA_MODULES_VARIABLE

    monkeypatch.setenv(EXTRA_MODULES_VARIABLE, "tcpwatch_no_such_module")
    with pytest.raises(UsageError, match="cannot import 'tcpwatch_no_such_module'"):
        registered_sources()
