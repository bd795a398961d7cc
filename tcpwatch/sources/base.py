"""What a source declares about itself, and what one poll hands it.

A source is declared where it is written, with a decorator on its read function::

    @netns_source("sockstat", field="sockstat", order=20)
    def read_sockstat_source(context: SourceContext, so_far: Snapshot) -> SockStat: ...

and the registry (``tcpwatch.sources.registry``) collects every declaration from the package. The
poll runs each one through one timing/failure wrapper, so ``tcpwatch_source_up`` and its siblings
cover a new source with no extra code. Three kinds:

- ``netns_source``: read once per polled namespace, from a thread inside it;
- ``host_source``: read once per poll for every namespace together (one /proc/*/fd walk);
- ``long_lived_source``: started once per namespace, gathers between polls on the pipeline's
  gathering thread (a netlink multicast subscription), drained by each poll;
- ``host_long_lived_source``: the same, started once for the whole host (kernel tracepoints are
  global), its drain given every namespace's snapshot so far and returning a value for each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from tcpwatch.config import CollectSettings
from tcpwatch.model import Attribution, Snapshot, SocketTable
from tcpwatch.paths import ProcPaths

# Re-exported: the pipeline keeps one FileMemo and polls hand it to the sources.
from tcpwatch.sources.filememo import FileMemo as FileMemo

Scope = Literal["netns", "host", "long-lived", "host-long-lived"]


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What one poll gives a source about the namespace it reads."""

    paths: ProcPaths  # procfs as seen from inside the namespace
    settings: CollectSettings
    netns: str  # the namespace's name, as labels show it
    netns_inode: int  # 0 when unknown
    taken_at: float  # unix time the namespace's snapshot is stamped with
    sysctl_names: tuple[str, ...] = ()  # what the rules declared they read
    earlier: SocketTable | None = None  # a table whose per-destination data this poll reuses
    # This namespace's snapshot from the previous poll (serve, check --window): a source on the
    # per-destination cadence (``earlier`` set) reuses its own value from it.
    previous: Snapshot | None = None
    known_owners: Attribution | None = None  # where each socket's owner was found last poll
    # Where another process says the owners are (check: its local daemon's /api/v1/owners):
    # confirmed like known_owners, one readlink each, but no earlier poll narrows what is wanted.
    owner_hints: Attribution | None = None
    # The sockets whose owners the rules will read (check: tcpwatch/owner_needs.py); None looks
    # for every candidate (listeners, the attributed states, the stalled connections).
    owner_inodes: frozenset[int] | None = None
    memo: FileMemo | None = None  # what earlier polls read of rarely changing files (serve)


@dataclass(frozen=True, slots=True)
class Partial:
    """What a source returns when it worked but had to leave some fields out.

    ``value`` fills the snapshot as usual; ``skipped`` (one note per field left out, naming it
    and why) marks the source degraded: up, with ``tcpwatch_source_degraded`` counting the notes.
    A source that could read nothing at all raises instead: it is not up.
    """

    value: object
    skipped: tuple[str, ...]


def _always(settings: CollectSettings) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Source:
    """A source read by every poll.

    ``read`` gets the context and the snapshot built so far (the values of the sources before
    it, ``needs`` naming those it uses); a ``host`` source gets every namespace's snapshot so far
    and returns one value for each. Its value fills the Snapshot field ``field`` (None: the
    source reports only its status). ``order`` places it in the poll among the sources whose
    ``needs`` are met, lower first: reading order matters where two sources must be close in
    time (sockstat right before the dump it is compared with).
    """

    name: str
    scope: Literal["netns", "host"]
    field: str | None
    order: int
    read: Callable[[SourceContext, Sequence[Snapshot]], object]
    needs: tuple[str, ...] = ()
    enabled: Callable[[CollectSettings], bool] = _always


class Gatherer(Protocol):
    """A long-lived source running in one namespace.

    ``read_ready`` runs on the gathering thread whenever ``fileno()`` is readable and must not
    block; ``drain`` runs on the poll thread and returns what was gathered (an immutable value).
    The two may run at once: the gatherer guards what they share. ``close`` is called once, from
    the poll thread, after the gathering thread has stopped watching it.
    """

    def fileno(self) -> int: ...

    def read_ready(self) -> None: ...

    def drain(self, so_far: Snapshot) -> object: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LongLivedSource:
    """A source that lives between polls: ``start`` runs inside the namespace (so sockets it opens
    belong to it) on the first poll that wants it, and again after it failed."""

    name: str
    field: str | None
    order: int
    start: Callable[[SourceContext], Gatherer]
    needs: tuple[str, ...] = ()
    enabled: Callable[[CollectSettings], bool] = _always

    @property
    def scope(self) -> Scope:
        return "long-lived"


class HostGatherer(Protocol):
    """A long-lived source running once for the host, as :class:`Gatherer` otherwise.

    ``drain`` gets the snapshot so far of every polled namespace (in poll order) and returns a
    value per namespace inode (one it did not hear about gets None), or ``Partial`` of that.
    """

    def fileno(self) -> int: ...

    def read_ready(self) -> None: ...

    def drain(self, so_far: Sequence[Snapshot]) -> Mapping[int, object] | Partial: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HostLongLivedSource:
    """A long-lived source started once for the whole host, after every namespace was read:
    ``start`` runs in tcpwatch's own namespace, on the first poll that wants it and again after
    it failed; each namespace's snapshot gets its share of the value and the one status."""

    name: str
    field: str | None
    order: int
    start: Callable[[SourceContext], HostGatherer]
    needs: tuple[str, ...] = ()
    enabled: Callable[[CollectSettings], bool] = _always

    @property
    def scope(self) -> Scope:
        return "host-long-lived"


AnySource = Source | LongLivedSource | HostLongLivedSource


def netns_source(
    name: str,
    *,
    field: str | None,
    order: int,
    needs: tuple[str, ...] = (),
    enabled: Callable[[CollectSettings], bool] = _always,
) -> Callable[[Callable[[SourceContext, Snapshot], object]], Source]:
    """Declare a per-namespace source on its read function."""

    def declare(read: Callable[[SourceContext, Snapshot], object]) -> Source:
        def read_one(context: SourceContext, so_far: Sequence[Snapshot]) -> object:
            return read(context, so_far[0])

        return Source(name, "netns", field, order, read_one, needs, enabled)

    return declare


def host_source(
    name: str,
    *,
    field: str | None,
    order: int,
    needs: tuple[str, ...] = (),
    enabled: Callable[[CollectSettings], bool] = _always,
) -> Callable[[Callable[[SourceContext, Sequence[Snapshot]], object]], Source]:
    """Declare a source read once per poll for every namespace (it returns one value for all)."""

    def declare(read: Callable[[SourceContext, Sequence[Snapshot]], object]) -> Source:
        return Source(name, "host", field, order, read, needs, enabled)

    return declare


def long_lived_source(
    name: str,
    *,
    field: str | None,
    order: int,
    needs: tuple[str, ...] = (),
    enabled: Callable[[CollectSettings], bool] = _always,
) -> Callable[[Callable[[SourceContext], Gatherer]], LongLivedSource]:
    """Declare a long-lived source on the function that starts its gatherer."""

    def declare(start: Callable[[SourceContext], Gatherer]) -> LongLivedSource:
        return LongLivedSource(name, field, order, start, needs, enabled)

    return declare


def host_long_lived_source(
    name: str,
    *,
    field: str | None,
    order: int,
    needs: tuple[str, ...] = (),
    enabled: Callable[[CollectSettings], bool] = _always,
) -> Callable[[Callable[[SourceContext], HostGatherer]], HostLongLivedSource]:
    """Declare a host-wide long-lived source on the function that starts its gatherer."""

    def declare(start: Callable[[SourceContext], HostGatherer]) -> HostLongLivedSource:
        return HostLongLivedSource(name, field, order, start, needs, enabled)

    return declare
