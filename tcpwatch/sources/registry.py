"""Every source the package declares, collected from its modules and put in poll order.

Nothing here is hand-kept: a module under ``tcpwatch/sources/`` that declares a source (see
``tcpwatch.sources.base``) is found by importing the package's modules. ``TCPWATCH_SOURCE_MODULES``
(comma-separated module names) adds modules from outside the package: a source being developed,
or the example source the tests run inside a real ``serve``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Iterable
from types import ModuleType

import tcpwatch.sources
from tcpwatch.errors import UsageError, describe_error
from tcpwatch.sources.base import AnySource, HostLongLivedSource, LongLivedSource, Source

EXTRA_MODULES_VARIABLE = "TCPWATCH_SOURCE_MODULES"
# Entering a namespace is the pipeline's own step, reported like a source (tcpwatch_source_up).
ENTERING = "netns"


class RegistryError(Exception):
    """Two sources with one name, or a source placed before one it needs: a bug, found early."""


def _package_modules() -> list[ModuleType]:
    package = tcpwatch.sources
    names = sorted(
        info.name for info in pkgutil.iter_modules(package.__path__) if info.name != "registry"
    )
    return [importlib.import_module(f"{package.__name__}.{name}") for name in names]


def _extra_modules() -> list[ModuleType]:
    wanted = os.environ.get(EXTRA_MODULES_VARIABLE, "")
    modules = []
    for name in (part.strip() for part in wanted.split(",")):
        if not name:
            continue
        try:
            modules.append(importlib.import_module(name))
        except Exception as error:  # any failure importing a user's module: one line, exit 3
            raise UsageError(
                f"{EXTRA_MODULES_VARIABLE}: cannot import {name[:100]!r}: "
                f"{describe_error(error)[:200]}"
            ) from None
    return modules


def declared_in(modules: Iterable[ModuleType]) -> tuple[AnySource, ...]:
    """The sources the modules declare, in poll order (``order``, then name); checked."""
    found: dict[str, AnySource] = {}
    for module in modules:
        for value in vars(module).values():
            if not isinstance(value, Source | LongLivedSource | HostLongLivedSource):
                continue
            other = found.get(value.name)
            if other is not None and other is not value:
                raise RegistryError(f"two sources are named {value.name!r}")
            found[value.name] = value
    ordered = tuple(sorted(found.values(), key=lambda source: (source.order, source.name)))
    placed: dict[str, int] = {ENTERING: -1}
    for source in ordered:
        for need in source.needs:
            if placed.get(need, source.order) >= source.order:
                raise RegistryError(
                    f"source {source.name!r} needs {need!r}, which is not read before it"
                )
        placed[source.name] = source.order
    return ordered


def registered_sources() -> tuple[AnySource, ...]:
    """Every source of the package (and of ``TCPWATCH_SOURCE_MODULES``), in poll order."""
    return declared_in([*_package_modules(), *_extra_modules()])


def host_source_names(sources: Iterable[AnySource] | None = None) -> frozenset[str]:
    """The sources read once for every namespace (the host-wide long-lived ones too): their
    health is the host's, not a namespace's."""
    chosen = registered_sources() if sources is None else sources
    return frozenset(
        s.name
        for s in chosen
        if (isinstance(s, Source) and s.scope == "host") or isinstance(s, HostLongLivedSource)
    )


def source_names(sources: Iterable[AnySource] | None = None) -> tuple[str, ...]:
    """What ``tcpwatch_source_*{source=...}`` can say: entering a namespace, then each source."""
    chosen = registered_sources() if sources is None else sources
    return (ENTERING, *(source.name for source in chosen))
