"""`tcpwatch serve`: the poll loop, signals and systemd notifications around one Pipeline.

Threads and what they share::

    main thread    waits for SIGTERM/SIGINT/SIGHUP (blocked, taken with sigtimedwait), reloads
    poll thread    every `interval`: Pipeline.poll() -> a new ExportState, published by one
                   reference assignment; pings the systemd watchdog between polls
    gather thread  feeds the long-lived sources between polls (tcpwatch.gathering)
    http threads   render the latest ExportState; they never poll

Shared values are immutable (Config, ExportState, WebConfig) and replaced whole, so no lock is
needed to read them. The poll thread alone owns the pipeline and its history.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable

from tcpwatch import __version__
from tcpwatch.config import Config, ConfigError
from tcpwatch.errors import UsageError
from tcpwatch.http.app import Health, WebApp
from tcpwatch.http.listen import ListenAddress, ListenError, parse_listen
from tcpwatch.http.server import WebServer
from tcpwatch.http.webconfig import WebConfig, load_web_config
from tcpwatch.logformat import fields
from tcpwatch.paths import procfs_problem
from tcpwatch.pipeline import Pipeline
from tcpwatch.sdnotify import Notifier
from tcpwatch.state import ExportState

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 3
# /-/healthy turns 503 when one poll has run this long: the loop is stuck (a hung netlink dump
# or /proc read). Generous, as a poll of a huge host with attribution can take many seconds.
STALLED_POLL_SECONDS = 120.0
STOP_JOIN_SECONDS = 1.0  # SIGTERM must end the process within 2 s, a poll in progress or not
# How often the main thread, between signals, looks for a dead poll or HTTP thread (then serve
# exits 3 and systemd restarts it; the watchdog pings stop at once). Each wake cost the process
# ~0.1 ms; once a second that was 3% of a quiet daemon's CPU. Signals are taken at once.
FAILURE_CHECK_SECONDS = 5.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The cyclic GC's youngest generation is collected after this many new containers instead of
# Python's 700: at 700 a quiet daemon ran a young collection about every poll and an older one
# every fifteen, each walking what the last polls kept; over 100 s of quiet polls its GC time
# went from 17 to 9 ms (docs/performance.md). gc.freeze() after start-up was measured too and
# spared nothing: the start-up objects are only walked by the rare oldest collection.
GC_YOUNG_THRESHOLD = 7000


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
        pipeline: Pipeline | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        stalled_after: float = STALLED_POLL_SECONDS,
        include_process_metrics: bool = True,
    ) -> None:
        self._config = config
        self._reload = reload
        self._notifier = notifier or Notifier(None)
        self._pipeline = pipeline or Pipeline()
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
        server = self._server
        if server is not None and (problem := server.problem()) is not None:
            return Health(problem)
        return Health()

    def failure(self) -> str | None:
        """Why the daemon can no longer work, if it cannot; checked by the main loop."""
        thread = self._poll_thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            return "the poll thread ended unexpectedly"
        server = self._server
        return server.problem() if server is not None else None

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
                return
        self._pipeline.close()

    def reload(self) -> bool:
        """Re-read the configuration (SIGHUP). An invalid one keeps the running one: False."""
        self._notifier.reloading("reloading the configuration")
        old = self._config
        try:
            new = self._reload()
            listen = parse_listen(new.listen)
            if (problem := procfs_problem(new.procfs)) is not None:
                raise UsageError(problem)
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
            # From this loop, so a hung poll stops the pings and systemd restarts tcpwatch; a
            # dead HTTP thread stops them too (the port would stay open, answering nothing).
            server = self._server
            if server is None or server.problem() is None:
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
            state = self._pipeline.poll(config)
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
    previous_gc = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *previous_gc[1:])
    try:
        daemon = Daemon(config, reload, web, notifier)
        try:
            server = daemon.start(listen)
        except ListenError as error:
            raise UsageError(str(error)) from None
        try:
            # As node_exporter: what is bound, not a URL guessed from it.
            tls = "true" if web.ssl_context is not None else "false"
            log.info("Listening on", extra=fields(address=server.address, tls=tls))
            log.info("tcpwatch %s serving: %s", __version__, describe(config, web))
            return _wait_for_signals(daemon)
        finally:
            daemon.stop()
            log.info("stopped")
    finally:
        _drain_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        gc.set_threshold(*previous_gc)


def _wait_for_signals(daemon: Daemon) -> int:
    while True:
        info = signal.sigtimedwait(_SIGNALS, FAILURE_CHECK_SECONDS)
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
