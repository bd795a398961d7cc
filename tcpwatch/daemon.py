"""`tcpwatch serve`: the poll loop, its history, signals and systemd notifications.

Threads and what they share::

    main thread   waits for SIGTERM/SIGINT/SIGHUP (blocked, taken with sigtimedwait), reloads
    poll thread   every `interval`: snapshot -> rules -> a new ExportState, published by one
                  reference assignment; pings the systemd watchdog between polls
    http threads  render the latest ExportState (web.py); they never poll

Shared values are immutable (Config, ExportState, WebConfig) and replaced whole, so no lock is
needed to read them. The poll thread alone owns the history (previous snapshot, CLOSE_WAIT
first-seen times, error counters, poll histogram).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tcpwatch import __version__
from tcpwatch.audit import audit, rule_settings
from tcpwatch.config import Config, ConfigError
from tcpwatch.errors import UsageError
from tcpwatch.model import Attribution, Snapshot, SocketTable
from tcpwatch.paths import ProcPaths
from tcpwatch.sdnotify import Notifier
from tcpwatch.snapshot import poll
from tcpwatch.sources.sysctl_files import PersistedSysctl, read_persisted_sysctls
from tcpwatch.state import ExportState, PollHistogram
from tcpwatch.validation import shown_path
from tcpwatch.web import Health, ListenAddress, ListenError, WebApp, WebServer, parse_listen
from tcpwatch.webconfig import WebConfig, load_web_config

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 3
# A source that keeps failing is logged when it starts, then at most this often, then when it
# recovers: enough to notice, never a line per poll.
SOURCE_LOG_REPEAT_SECONDS = 300.0
# /-/healthy turns 503 when one poll has run this long: the loop is stuck (a hung netlink dump
# or /proc read). Generous, as a poll of a huge host with attribution can take many seconds.
STALLED_POLL_SECONDS = 120.0
STOP_JOIN_SECONDS = 1.0  # SIGTERM must end the process within 2 s, a poll in progress or not
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- history across polls -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetnsHistory:
    """What the rules of one namespace remember from earlier polls."""

    previous: Snapshot | None = None
    close_wait_first_seen: Mapping[int, float] = field(default_factory=dict)


def track_close_wait(first_seen: Mapping[int, float], snapshot: Snapshot) -> Mapping[int, float]:
    """CLOSE_WAIT socket inode -> unix time it was first seen, carried over from ``first_seen``.

    Inodes no longer in CLOSE_WAIT are dropped (their socket closed, or an inode number came
    back for a new socket, which then starts afresh). When the socket source failed this poll
    nothing is known, so the old times are kept; when CLOSE_WAIT sockets are not collected at
    all (``collect.attribute_states`` lacks close_wait) there is nothing to track.
    """
    if snapshot.sockets is None:
        return first_seen
    inodes = snapshot.sockets.inodes_by_state.get("close_wait")
    if inodes is None:
        return {}
    return {inode: first_seen.get(inode, snapshot.taken_at) for inode in inodes if inode != 0}


class SnapshotTaker:
    """Polls every namespace the configuration selects (`namespaces:`, `--netns`), carrying what
    makes the next poll cheaper: where each socket's owner was found (re-checked with one
    readlink each instead of a walk of every process' fds) and each namespace's per-destination
    data, dumped afresh only every `collect.destinations_interval` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._known: Attribution | None = None
        self._tables: dict[str, SocketTable] = {}
        self._destinations_at: float | None = None

    def __call__(self, config: Config) -> tuple[Snapshot, ...]:
        now = self._clock()
        interval = config.collect.destinations_interval
        due = (
            self._destinations_at is None
            or interval <= 0
            or now - self._destinations_at >= interval
        )
        snapshots = poll(
            config.collect,
            config.namespaces,
            ProcPaths(root=config.procfs),
            known_owners=self._known,
            earlier=None if due else self._tables,
        )
        if due:
            self._destinations_at = now
        self._known = next((s.attribution for s in snapshots if s.attribution), None)
        self._tables = {s.netns: s.sockets for s in snapshots if s.sockets is not None}
        return snapshots


@dataclass(frozen=True, slots=True)
class _Failing:
    since_poll: int  # failed polls in a row
    logged_at: float  # monotonic time of the latest line
    unlogged: int  # failures since that line
    error: str


class SourceFailureLog:
    """Logs failing sources per (netns, source): the first failure, a reminder at most every
    ``repeat_seconds`` while it keeps failing, and one line when it recovers."""

    def __init__(
        self,
        repeat_seconds: float = SOURCE_LOG_REPEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self._repeat = repeat_seconds
        self._clock = clock
        self._log = logger
        self._failing: dict[tuple[str, str], _Failing] = {}

    def record(self, snapshots: Iterable[Snapshot]) -> None:
        now = self._clock()
        seen: set[tuple[str, str]] = set()
        for snapshot in snapshots:
            for status in snapshot.sources:
                key = (snapshot.netns, status.name)
                seen.add(key)
                failing = self._failing.get(key)
                if status.ok:
                    if failing is not None:
                        del self._failing[key]
                        self._log.warning(
                            "source %s in netns %s recovered after %d failed poll%s",
                            status.name,
                            snapshot.netns,
                            failing.since_poll,
                            "" if failing.since_poll == 1 else "s",
                        )
                    continue
                error = status.error or "unknown error"
                if failing is None:
                    self._log.warning(
                        "source %s in netns %s failed: %s (its metrics are absent and "
                        "tcpwatch_source_up is 0; repeated at most every %.0f s)",
                        status.name,
                        snapshot.netns,
                        error,
                        self._repeat,
                    )
                    self._failing[key] = _Failing(1, now, 0, error)
                elif now - failing.logged_at >= self._repeat:
                    self._log.warning(
                        "source %s in netns %s still failing (%d polls in a row, %d since the "
                        "last line): %s",
                        status.name,
                        snapshot.netns,
                        failing.since_poll + 1,
                        failing.unlogged + 1,
                        error,
                    )
                    self._failing[key] = _Failing(failing.since_poll + 1, now, 0, error)
                else:
                    self._failing[key] = _Failing(
                        failing.since_poll + 1, failing.logged_at, failing.unlogged + 1, error
                    )
        # A namespace that vanished, or a source that did not run (attribution switched off):
        # forget it rather than report a recovery that never happened.
        for key in [key for key in self._failing if key not in seen]:
            del self._failing[key]

    def failing(self) -> dict[tuple[str, str], str]:
        return {key: value.error for key, value in self._failing.items()}


class Poller:
    """Turns polls into ExportStates, carrying the history rules and counters need.

    Only the poll thread calls :meth:`poll`; the state it returns is immutable.
    """

    def __init__(
        self,
        take: Callable[[Config], Sequence[Snapshot]] | None = None,
        persisted: Callable[[], tuple[PersistedSysctl, ...]] = read_persisted_sysctls,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        failure_log: SourceFailureLog | None = None,
    ) -> None:
        self._take = take or SnapshotTaker()
        self._persisted = persisted
        self._clock = clock
        self._timer = timer
        self._failure_log = failure_log or SourceFailureLog()
        self._history: dict[str, NetnsHistory] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._durations = PollHistogram()

    def history(self, netns: str) -> NetnsHistory:
        return self._history.get(netns, NetnsHistory())

    def poll(self, config: Config) -> ExportState:
        started_at = self._clock()
        started = self._timer()
        snapshots = tuple(self._take(config))
        try:
            persisted = self._persisted()
        except Exception as error:  # advice input only: rules just see no persisted lines
            log.debug("reading persisted sysctl files failed: %s", error)
            persisted = ()
        history: dict[str, NetnsHistory] = {}
        previous: dict[str, Snapshot] = {}
        for snapshot in snapshots:
            past = self._history.get(snapshot.netns, NetnsHistory())
            if past.previous is not None:
                previous[snapshot.netns] = past.previous
            first_seen = track_close_wait(past.close_wait_first_seen, snapshot)
            history[snapshot.netns] = NetnsHistory(snapshot, first_seen)
        findings = audit(
            snapshots,
            previous,
            rule_settings(config),
            persisted,
            {netns: past.close_wait_first_seen for netns, past in history.items()},
        )
        present = set(history)
        self._history = history
        errors = {key: count for key, count in self._errors.items() if key[0] in present}
        for snapshot in snapshots:
            for status in snapshot.sources:
                if not status.ok:
                    key = (snapshot.netns, status.name)
                    errors[key] = errors.get(key, 0) + 1
        self._errors = errors
        self._failure_log.record(snapshots)
        self._durations = self._durations.observe(self._timer() - started)
        return ExportState(
            snapshots=snapshots,
            findings=tuple(findings),
            last_poll=started_at,
            poll_durations=self._durations,
            source_errors=dict(errors),
            top_processes=config.collect.top_processes,
            top_destinations=config.collect.top_destinations,
            cached=True,
        )


def status_line(state: ExportState, interval: float) -> str:
    """systemd's STATUS=, e.g. ``polling every 15s; 2 findings (1 critical); 1 source failing``."""
    critical = sum(1 for f in state.findings if f.severity == "critical")
    count = len(state.findings)
    text = f"polling every {interval:g}s; {count} finding{'' if count == 1 else 's'}"
    if critical:
        text += f" ({critical} critical)"
    failing = sum(1 for s in state.snapshots for status in s.sources if not status.ok)
    if failing:
        text += f"; {failing} source{'' if failing == 1 else 's'} failing"
    return text


# -- the daemon -----------------------------------------------------------------------------------


class Daemon:
    """The poll loop and the web server around one running configuration.

    ``reload`` re-reads the configuration (re-applying command-line flags); it raises
    ConfigError or UsageError when the result is invalid.
    """

    def __init__(
        self,
        config: Config,
        reload: Callable[[], Config],
        web_config: WebConfig | None = None,
        notifier: Notifier | None = None,
        poller: Poller | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        stalled_after: float = STALLED_POLL_SECONDS,
        include_process_metrics: bool = True,
    ) -> None:
        self._config = config
        self._reload = reload
        self._notifier = notifier or Notifier(None)
        self._poller = poller or Poller()
        self._monotonic = monotonic
        self._stalled_after = stalled_after
        self._state: ExportState | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._poll_now = threading.Event()
        self._polled = threading.Event()  # set after every finished poll (tests wait on it)
        self._poll_started: float | None = None  # monotonic start of the poll in progress
        self._polls = 0
        self._poll_thread: threading.Thread | None = None
        self._server: WebServer | None = None
        self.app = WebApp(
            lambda: self._state,
            lambda: self._config,
            self.health,
            web_config,
            include_process_metrics=include_process_metrics,
        )

    # -- read by other threads ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def state(self) -> ExportState | None:
        return self._state

    @property
    def polls(self) -> int:
        return self._polls

    @property
    def server(self) -> WebServer | None:
        return self._server

    def health(self) -> Health:
        started = self._poll_started
        if started is not None:
            running = self._monotonic() - started
            if running > self._stalled_after:
                return Health(
                    f"the current poll has been running for {running:.0f} s "
                    f"(limit {self._stalled_after:.0f} s): the poll loop is stuck"
                )
        thread = self._poll_thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            return Health("the poll thread has died (see the log)")
        return Health()

    def failure(self) -> str | None:
        """Why the daemon can no longer work, if it cannot; checked by the main loop."""
        thread = self._poll_thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            return "the poll thread ended unexpectedly"
        return None

    def wait_for_poll(self, after: int, timeout: float) -> bool:
        """Wait until more than ``after`` polls have finished (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._polls <= after:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._polled.wait(min(remaining, 0.1))
            self._polled.clear()
        return True

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, listen: ListenAddress) -> WebServer:
        """Bind the web server (ListenError if that fails), then start serving and polling."""
        server = WebServer(listen, self.app)
        self._server = server
        server.start()
        thread = threading.Thread(target=self._poll_loop, name="poll", daemon=True)
        self._poll_thread = thread
        thread.start()
        return server

    def stop(self) -> None:
        """Stop polling and serving; returns within about STOP_JOIN_SECONDS + 0.2 s."""
        self._notifier.stopping("stopping")
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.stop()
        thread = self._poll_thread
        if thread is not None and thread.is_alive():
            thread.join(timeout=STOP_JOIN_SECONDS)
            if thread.is_alive():
                # It is a daemon thread: the process exits without it.
                log.warning("a poll was still running at shutdown; not waiting for it")

    def reload(self) -> bool:
        """Re-read the configuration (SIGHUP). An invalid one keeps the running one: False."""
        self._notifier.reloading("reloading the configuration")
        old = self._config
        try:
            new = self._reload()
            listen = parse_listen(new.listen)
            if not os.path.isfile(os.path.join(new.procfs, "net", "sockstat")):
                raise UsageError(
                    f"{shown_path(new.procfs)} does not look like a procfs mount (no net/sockstat)"
                )
            web = load_web_config(new.web_config) if new.web_config else WebConfig()
        except ConfigError as error:
            self._reload_failed("; ".join(error.errors))
            return False
        except (UsageError, ListenError) as error:
            self._reload_failed(str(error))
            return False
        except Exception as error:  # a reload must never take a running daemon down
            log.debug("reload traceback", exc_info=True)
            self._reload_failed(f"unexpected {type(error).__name__}: {error}")
            return False
        if new.listen != old.listen:
            log.warning(
                "listen changed from %s to %s: that takes a restart; still serving on %s",
                old.listen,
                listen,
                old.listen,
            )
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level.upper())
        self.app.set_web_config(web)
        self._config = new
        self._poll_now.set()  # changed collect settings and rules show at once
        self._wake.set()
        log.info("configuration reloaded from %s: %s", new.source, describe(new, web))
        state = self._state
        self._notifier.ready(status_line(state, new.interval) if state else "reloaded")
        return True

    def _reload_failed(self, why: str) -> None:
        log.error("reload failed, still running the previous configuration: %s", why)
        state = self._state
        self._notifier.ready(
            status_line(state, self._config.interval) if state else "reload failed"
        )

    # -- the poll thread --------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        next_poll = self._monotonic()
        watchdog = self._notifier.watchdog_seconds
        while not self._stop.is_set():
            now = self._monotonic()
            if now >= next_poll or self._poll_now.is_set():
                self._poll_now.clear()
                self._poll_once()
                # Measured from the poll's start, so the cadence does not drift by its length;
                # a poll longer than the interval is followed by the next one at once.
                next_poll = now + self._config.interval
            # From this loop, so a hung poll stops the pings and systemd restarts tcpwatch.
            self._notifier.watchdog()
            delay = max(next_poll - self._monotonic(), 0.0)
            if watchdog is not None:
                delay = min(delay, watchdog)
            self._wake.wait(delay)
            self._wake.clear()

    def _poll_once(self) -> None:
        config = self._config
        self._poll_started = self._monotonic()
        try:
            state = self._poller.poll(config)
        except Exception as error:  # a bug in one poll must not end the loop
            log.error("poll failed: %s: %s", type(error).__name__, error)
            log.debug("poll traceback", exc_info=True)
            return
        finally:
            self._poll_started = None
        first = self._state is None
        self._state = state
        self._polls += 1
        self._polled.set()
        status = status_line(state, config.interval)
        if first:
            log.info("first poll done in %.2f s: ready", state.poll_durations.total)
            self._notifier.ready(status)
        else:
            self._notifier.status(status)


def describe(config: Config, web: WebConfig) -> str:
    """One line about a running configuration, for the startup and reload log lines."""
    collect = config.collect
    attribution = (
        f"process attribution of {', '.join(collect.attribute_states) or 'listeners'}"
        if collect.process_attribution
        else "no process attribution"
    )
    disabled = sorted(rule_id for rule_id, o in config.rules.items() if not o.enabled)
    tuned = sum(len(o.thresholds) for o in config.rules.values())
    rules = (
        f"{len(disabled)} rules disabled ({', '.join(disabled)})" if disabled else "all rules on"
    )
    return (
        f"polling {', '.join(config.namespaces)} every {config.interval:g} s, {attribution}, "
        f"{rules}, {tuned} thresholds set; web: {web.summary()}"
    )


# -- entry point ----------------------------------------------------------------------------------


def serve(config: Config, reload: Callable[[], Config]) -> int:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads. Returns the exit code.

    Startup problems (bad listen address, port taken, broken web config) raise UsageError or
    ConfigError, which the CLI prints as one line each and turns into exit code 3.
    """
    try:
        listen = parse_listen(config.listen)
    except ListenError as error:
        raise UsageError(str(error)) from None
    web = load_web_config(config.web_config) if config.web_config else WebConfig()
    notifier = Notifier.from_environment()
    # systemd's watchdog kills a hung daemon with SIGABRT: leave every thread's stack in the log.
    faulthandler.enable()
    # Blocked in every thread (the ones started below inherit the mask), taken by sigtimedwait:
    # no handler runs at an arbitrary point of the main thread, so none can deadlock on a lock.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        daemon = Daemon(config, reload, web, notifier)
        try:
            server = daemon.start(listen)
        except ListenError as error:
            raise UsageError(str(error)) from None
        try:
            log.info("tcpwatch %s serving %s (%s)", __version__, server.url, describe(config, web))
            return _wait_for_signals(daemon)
        finally:
            daemon.stop()
            log.info("stopped")
    finally:
        _drain_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _wait_for_signals(daemon: Daemon) -> int:
    while True:
        info = signal.sigtimedwait(_SIGNALS, 1.0)
        if info is None:
            problem = daemon.failure()
            if problem is not None:
                log.error("stopping: %s", problem)
                return EXIT_FAILED
            continue
        if info.si_signo == signal.SIGHUP:
            log.info("SIGHUP: reloading the configuration")
            daemon.reload()
            continue
        log.info("%s received: stopping", signal.Signals(info.si_signo).name)
        return EXIT_OK


def _drain_signals() -> None:
    # A second SIGTERM during shutdown must not kill the process once the mask is lifted.
    while signal.sigpending() & set(_SIGNALS):
        signal.sigtimedwait(_SIGNALS, 0)
