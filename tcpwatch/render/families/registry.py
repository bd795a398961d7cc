"""Every metric family the package declares, collected from its modules, in exposition order.

Nothing here is hand-kept: a module under ``tcpwatch/render/families/`` that declares a family
(see ``tcpwatch.render.families.base``) is found by importing the package's modules, as the
source registry finds sources.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import tcpwatch.render.families
from tcpwatch.render.families.base import PIPELINE, Family, NoFamilies

_NOT_FAMILIES = ("base", "registry")


class FamilyRegistryError(Exception):
    """Two declarations for one source's families, or one in the wrong module: a bug."""


@dataclass(frozen=True, slots=True)
class Declared:
    families: tuple[Family, ...]  # in exposition order: ``order``, then source and name
    unexported: tuple[NoFamilies, ...]  # sources that export nothing, by name


def package_modules() -> list[ModuleType]:
    package = tcpwatch.render.families
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if info.name not in _NOT_FAMILIES
    )
    return [importlib.import_module(f"{package.__name__}.{name}") for name in names]


def declared_in(modules: Iterable[ModuleType]) -> Declared:
    """The families and NoFamilies the modules declare; each in the module named after its
    source (``pipeline`` for :data:`PIPELINE`), and a source not both exported and not."""
    families: dict[str, Family] = {}
    unexported: dict[str, NoFamilies] = {}
    for module in modules:
        home = module.__name__.rpartition(".")[2]
        for value in vars(module).values():
            if not isinstance(value, Family | NoFamilies):
                continue
            if value.source != home:
                raise FamilyRegistryError(
                    f"{module.__name__} declares {value.source!r}'s families: they belong in "
                    f"tcpwatch/render/families/{value.source}.py"
                )
            if isinstance(value, Family):
                families[value.name] = value
            else:
                unexported[value.source] = value
    both = {family.source for family in families.values()} & set(unexported)
    if both:
        raise FamilyRegistryError(f"sources declared with families and without: {sorted(both)}")
    ordered = sorted(families.values(), key=lambda f: (f.order, f.source, f.name))
    return Declared(tuple(ordered), tuple(sorted(unexported.values(), key=lambda u: u.source)))


def registered() -> Declared:
    return declared_in(package_modules())


def registered_families() -> tuple[Family, ...]:
    """Every family of the package, in exposition order."""
    return registered().families


def uncovered(declared: Declared, sources: Iterable[tuple[str, str | None]]) -> list[str]:
    """What does not match between the families and the sources ``(name, Snapshot field)``:
    a family of no source, and a source with a field that has neither families nor a
    NoFamilies saying why. Empty when every source's value reaches the exposition or is
    declared not to."""
    named = dict(sources)
    problems = [
        f"{family.name} renders {family.source!r}, which is no registered source"
        for family in declared.families
        if family.source != PIPELINE and family.source not in named
    ]
    problems += [
        f"NoFamilies for {entry.source!r}, which is no registered source"
        for entry in declared.unexported
        if entry.source not in named
    ]
    covered = {family.source for family in declared.families}
    covered |= {entry.source for entry in declared.unexported}
    problems += [
        f"source {name!r} fills Snapshot.{field} but has no tcpwatch/render/families/{name}.py "
        "declaring its families (or NoFamilies)"
        for name, field in named.items()
        if field is not None and name not in covered
    ]
    return problems
