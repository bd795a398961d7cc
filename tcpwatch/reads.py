"""Which fields of a poll's frozen values a pure function read, so its result can be reused
while they are equal.

The metric families (render/memo.py) are pure functions of an ExportState. Run over
:func:`read_state` (the same values in subclasses that note every field and method looked up,
its snapshots' too), such a function says what it depended on: on this input. Another input
equal in each of those fields makes it take the same path and return the same thing, however
its other fields changed. Noting happens on every run, so a function that reads more on some
inputs is seen doing so on those.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tcpwatch.model import Snapshot
from tcpwatch.state import ExportState

SNAPSHOT_FIELDS = tuple(f.name for f in fields(Snapshot))
STATE_FIELDS = tuple(f.name for f in fields(ExportState))


def _noting_getattribute(self: Any, name: str) -> Any:
    """Note the name of every field or method read (``reads`` itself and dunders aside)."""
    if name != "reads" and not name.startswith("__"):
        object.__getattribute__(self, "reads").add(name)
    return object.__getattribute__(self, name)


class ReadSnapshot(Snapshot):
    """A Snapshot that notes the names of the fields and methods read from it in ``reads``."""

    __slots__ = ("reads",)
    reads: set[str]

    __getattribute__ = _noting_getattribute


def read_snapshot(snapshot: Snapshot) -> ReadSnapshot:
    noted = ReadSnapshot(*(getattr(snapshot, name) for name in SNAPSHOT_FIELDS))
    object.__setattr__(noted, "reads", set())
    return noted


class ReadState(ExportState):
    """An ExportState that notes the fields read from it; its snapshots are ReadSnapshots."""

    __slots__ = ("reads",)
    reads: set[str]

    __getattribute__ = _noting_getattribute


def read_state(state: ExportState) -> ReadState:
    values = {name: getattr(state, name) for name in STATE_FIELDS}
    values["snapshots"] = tuple(read_snapshot(s) for s in state.snapshots)
    noted = ReadState(**values)
    object.__setattr__(noted, "reads", set())
    return noted


def same(x: object, y: object) -> bool:
    """Equal values; one kept from the previous poll (a quiet namespace's table parts) is the
    same object, which spares comparing it."""
    return x is y or bool(x == y)
