"""One poll from sources to findings, the same for `serve`, `check` and `metrics`.

A :class:`Pipeline` takes the snapshot of each selected namespace (carrying what makes the next
poll cheaper), keeps the history between polls, runs the rules and returns the
:class:`~tcpwatch.state.ExportState` every renderer reads. It owns the gathering thread of the
long-lived sources; ``close()`` stops them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from tcpwatch import snapshot as snapshot_source
from tcpwatch.audit import audit, rule_settings
from tcpwatch.config import Config
from tcpwatch.gathering import HOST, Gathering
from tcpwatch.history import (
    NetnsHistory,
    SourceFailureLog,
    remember,
    track_close_wait,
    window_start,
)
from tcpwatch.model import Attribution, Snapshot, SocketTable
from tcpwatch.owner_needs import MAX_ROUNDS, asked_owners
from tcpwatch.paths import ProcPaths
from tcpwatch.peer_budget import PeerBudget
from tcpwatch.rules import SYSCTLS_USED, RuleSettings
from tcpwatch.sources.base import FileMemo
from tcpwatch.sources.netns import NetnsNames
from tcpwatch.sources.registry import host_source_names, registered_sources, source_names
from tcpwatch.state import ExportState, PollHistogram, Trend
from tcpwatch.trends import next_trend


class SnapshotTaker:
    """Polls every namespace the configuration selects (`namespaces:`, `--netns`), carrying what
    makes the next poll cheaper: where each socket's owner was found (re-checked with one
    readlink each instead of a walk of every process' fds) and each namespace's per-destination
    data, dumped afresh only every `collect.destinations_interval` seconds.

    ``owners_for_findings`` (check) leaves the owner sources out of the poll: the pipeline runs
    them afterwards through :meth:`attribute`, for the sockets whose owners its rules read."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        gathering: Gathering | None = None,
        owner_hints: Attribution | None = None,
        owners_for_findings: bool = False,
    ) -> None:
        self._clock = clock
        self._gathering = gathering
        self._known: Attribution | None = None
        self._hints = owner_hints  # for the first poll only: later polls have their own
        self._tables: dict[str, SocketTable] = {}
        self._previous: dict[str, Snapshot] = {}  # each namespace's latest snapshot
        self._destinations_at: float | None = None
        # The name each namespace had: a transient procfs failure must not rename its series.
        self._names = NetnsNames()
        self._sources = registered_sources()  # the package does not change while it runs
        self._deferred = snapshot_source.owner_sources(self._sources) if owners_for_findings else ()
        self._polled = tuple(s for s in self._sources if s not in self._deferred)
        self._memo = FileMemo()  # /etc/sysctl.d and the like, re-read only when they change

    def __call__(self, config: Config) -> tuple[Snapshot, ...]:
        now = self._clock()
        interval = config.collect.destinations_interval
        due = (
            self._destinations_at is None
            or interval <= 0
            or now - self._destinations_at >= interval
        )
        snapshots = snapshot_source.poll(
            config.collect,
            config.namespaces,
            ProcPaths(root=config.procfs, rootfs=config.rootfs),
            known_owners=self._known,
            earlier=None if due else self._tables,
            gathering=self._gathering,
            sysctl_names=SYSCTLS_USED,
            names=self._names,
            sources=self._polled,
            previous=self._previous,
            owner_hints=self._hints if self._known is None else None,
            memo=self._memo,
        )
        if self._gathering is not None:
            # A gatherer whose namespace was not polled (vanished) or whose source did not run
            # (switched off by a reload) is stopped.
            self._gathering.retire(
                {
                    (inode, status.name)
                    for s in snapshots
                    for status in s.sources
                    for inode in (s.identity.inode, HOST)  # HOST: a host-wide one's key
                }
            )
        self._memo.end_poll()
        if due:
            self._destinations_at = now
        if not self._deferred:
            self._known = next((s.attribution for s in snapshots if s.attribution), None)
        self._tables = {s.netns: s.sockets for s in snapshots if s.sockets is not None}
        self._previous = {s.netns: s for s in snapshots}
        return snapshots

    @property
    def defers_owners(self) -> bool:
        """Whether polls leave the owner sources to :meth:`attribute`."""
        return bool(self._deferred)

    def attribute(
        self, config: Config, snapshots: Sequence[Snapshot], inodes: frozenset[int] | None
    ) -> tuple[Snapshot, ...]:
        """``snapshots`` of this poll with the owners of ``inodes`` looked for (None: every
        candidate), confirming where the previous poll (or the hints) found them first."""
        known = next((s.attribution for s in snapshots if s.attribution), self._known)
        attributed = snapshot_source.attribute(
            snapshots,
            config.collect,
            ProcPaths(root=config.procfs, rootfs=config.rootfs),
            self._deferred,
            inodes,
            known_owners=known,
            owner_hints=self._hints if known is None else None,
        )
        self._known = next((s.attribution for s in attributed if s.attribution), self._known)
        self._previous = {s.netns: s for s in attributed}
        return attributed

    def close(self) -> None:
        """Close what is held between polls (/proc/sys descriptors)."""
        self._memo.close()


class Pipeline:
    """Turns polls into ExportStates, carrying the history rules and counters need.

    Only one thread calls :meth:`poll` (serve's poll thread, or the CLI); the state it returns
    is immutable. ``long_lived`` starts the long-lived sources (serve, and check with a window);
    ``cached`` marks the state as served between polls (HELP says so); ``failure_log`` None
    leaves logging failed sources to the caller; ``owner_hints`` (check: its local daemon's
    owners) are confirmed by the first poll's owner search before it walks;
    ``owners_for_findings`` (check) looks only for the owners the rules read
    (tcpwatch/owner_needs.py), instead of every listener's and attributed socket's.
    """

    def __init__(
        self,
        take: Callable[[Config], Sequence[Snapshot]] | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        failure_log: SourceFailureLog | None = None,
        long_lived: bool = True,
        cached: bool = True,
        log_failures: bool = True,
        owner_hints: Attribution | None = None,
        owners_for_findings: bool = False,
    ) -> None:
        self._gathering = Gathering() if long_lived and take is None else None
        self._taker: SnapshotTaker | None = None  # its own, closed with it
        if take is None:
            take = self._taker = SnapshotTaker(
                gathering=self._gathering,
                owner_hints=owner_hints,
                owners_for_findings=owners_for_findings,
            )
        self._take = take
        self._clock = clock
        self._timer = timer
        self._failure_log = (failure_log or SourceFailureLog()) if log_failures else None
        self._cached = cached
        self._source_names = source_names()
        self._host_sources = host_source_names()
        self._history: dict[str, NetnsHistory] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._durations = PollHistogram()
        self._trends: dict[str, Trend] = {}
        self._peers = PeerBudget()

    def history(self, netns: str) -> NetnsHistory:
        return self._history.get(netns, NetnsHistory())

    def poll(self, config: Config) -> ExportState:
        started_at = self._clock()
        started = self._timer()
        # One row budget for every namespace's per-peer connection series (peer_budget.py).
        taken = self._peers.apply(
            self._take(config), config.collect.connection_peers, config.collect.connection_peer_idle
        )
        starts: dict[str, Snapshot] = {}  # where each namespace's rule window starts
        previous: dict[str, Snapshot] = {}  # each namespace's latest poll before this one
        first_seen: dict[str, Mapping[int, float]] = {}
        seconds = config.rules_window
        for snapshot in taken:
            past = self._history.get(snapshot.netns, NetnsHistory())
            start = window_start(past.polls, snapshot, seconds)
            if start is not None:
                starts[snapshot.netns] = start
            if past.previous is not None:
                previous[snapshot.netns] = past.previous
            first_seen[snapshot.netns] = track_close_wait(past.close_wait_first_seen, snapshot)
        settings = rule_settings(config)
        snapshots = self._attributed(config, taken, starts, settings, first_seen)
        history: dict[str, NetnsHistory] = {}
        for snapshot in snapshots:
            past = self._history.get(snapshot.netns, NetnsHistory())
            polls = remember(past.polls, snapshot, seconds)
            history[snapshot.netns] = NetnsHistory(polls, first_seen[snapshot.netns])
        findings = audit(snapshots, starts, settings, first_seen)
        # The views' history (state totals, counter rates); a vanished namespace's is dropped.
        self._trends = {
            s.netns: next_trend(self._trends.get(s.netns), previous.get(s.netns), s)
            for s in snapshots
        }
        present = set(history)
        self._history = history
        errors = {key: count for key, count in self._errors.items() if key[0] in present}
        for snapshot in snapshots:
            for status in snapshot.sources:
                if not status.ok:
                    key = (snapshot.netns, status.name)
                    errors[key] = errors.get(key, 0) + 1
        self._errors = errors
        if self._failure_log is not None:
            self._failure_log.record(snapshots)
        self._durations = self._durations.observe(self._timer() - started)
        return ExportState(
            snapshots=tuple(snapshots),
            findings=tuple(findings),
            last_poll=started_at,
            poll_durations=self._durations,
            source_errors=dict(errors),
            top_processes=config.collect.top_processes,
            top_destinations=config.collect.top_destinations,
            live_peers=config.collect.live_peers,
            cached=self._cached,
            source_names=self._source_names,
            host_sources=self._host_sources,
            trends=dict(self._trends),
            interval=config.interval,
            window=max(
                (s.taken_at - starts[s.netns].taken_at for s in snapshots if s.netns in starts),
                default=0.0,
            ),
        )

    def _attributed(
        self,
        config: Config,
        snapshots: Sequence[Snapshot],
        starts: Mapping[str, Snapshot],
        settings: Mapping[str, RuleSettings],
        first_seen: Mapping[str, Mapping[int, float]],
    ) -> Sequence[Snapshot]:
        """With a taker that defers the owners (check): the owners the rules read, looked for
        until the rules ask for none not looked for yet (tcpwatch/owner_needs.py)."""
        take = self._take
        if not isinstance(take, SnapshotTaker) or not take.defers_owners:
            return snapshots
        looked = asked_owners(snapshots, starts, settings, first_seen)
        for _ in range(MAX_ROUNDS):
            snapshots = take.attribute(config, snapshots, looked)
            if looked is None:
                return snapshots
            asked = asked_owners(snapshots, starts, settings, first_seen)
            if asked is not None and asked <= looked:
                return snapshots
            looked = None if asked is None else looked | asked
        return take.attribute(config, snapshots, None)  # never settled: every candidate

    def close(self) -> None:
        """Stop the long-lived sources (at exit; the pipeline is not used afterwards)."""
        if self._gathering is not None:
            self._gathering.close()
        if self._taker is not None:
            self._taker.close()
