"""`tcpwatch check`: one audit of this host (or a daemon's, with --from) as a Nagios plugin.

Every way it can end prints a status on stdout, as the monitoring-plugins guidelines want:
the report (text with perfdata, JSON, or the sysctl snippet), or, when the check could not be
done (a bad flag or config, no netlink, an unreachable daemon, the --timeout), one line
``TCPWATCH UNKNOWN - <why>`` (a JSON report with ``error`` for --format json), exit 3.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TextIO

from tcpwatch.cli_parser import EXIT_CRITICAL, EXIT_UNKNOWN
from tcpwatch.config import Config, RuleCatalogue, RuleOverride
from tcpwatch.errors import UsageError
from tcpwatch.escape import terminal
from tcpwatch.paths import procfs_problem
from tcpwatch.state import ExportState
from tcpwatch.validation import parse_seconds, show

if TYPE_CHECKING:
    from tcpwatch.model import Snapshot
    from tcpwatch.pipeline import Pipeline
    from tcpwatch.render.scope import OwnersOrigin
    from tcpwatch.rules.base import Finding

log = logging.getLogger("tcpwatch")


def require_linux(procfs: str) -> None:
    if not sys.platform.startswith("linux"):
        raise UsageError(
            f"tcpwatch needs Linux (netlink sock_diag and procfs); this is {sys.platform}"
        )
    if (problem := procfs_problem(procfs)) is not None:
        raise UsageError(f"{problem}: pass --path.procfs pointing at a mounted /proc")


def usable(config: Config, state: ExportState) -> ExportState:
    """The state of a poll, or UsageError when nothing could be read (no netlink, no procfs,
    no namespace matched): then there is nothing to report on."""
    snapshots = state.snapshots
    if not any(snapshot.sockets is not None for snapshot in snapshots):
        failed = [s for snap in snapshots for s in snap.sources if not s.ok]
        wanted = ",".join(config.namespaces)
        reason = failed[0].error if failed else f'no network namespace matched "{wanted}" (--netns)'

        if failed and failed[0].name == "sockdiag":
            reason = (
                f"cannot read TCP sockets over netlink sock_diag: {reason} "
                "(is this Linux with CONFIG_INET_DIAG, and is netlink allowed here?)"
            )
        elif failed:
            reason = f"cannot poll namespace {snapshots[0].netns}: {reason}"
        raise UsageError(reason)
    # A missing sysctl is absent, not an error, so /proc/net tells whether procfs is usable.
    procfs_sources = {"sockstat", "counters"}
    broken = [
        status
        for snapshot in snapshots
        for status in snapshot.sources
        if status.name in procfs_sources and not status.ok
    ]
    if len(broken) == len(procfs_sources) * len(snapshots):
        raise UsageError(
            f"{config.procfs}: cannot read procfs ({broken[0].name}: {broken[0].error}); "
            "pass --path.procfs pointing at a mounted /proc"
        )
    for snapshot in snapshots:
        for status in snapshot.sources:
            if not status.ok:
                log.warning(
                    "netns %s: source %s failed: %s", snapshot.netns, status.name, status.error
                )
    return state


def check(config: Config, args: argparse.Namespace) -> int:
    from tcpwatch.cli_owners import owner_hints
    from tcpwatch.pipeline import Pipeline
    from tcpwatch.rules import worst_exit_code

    # With a window, the long-lived sources hear what happens during it.
    windowed = config.check_window > 0
    seconds = timeout_of(args, config.check_window)
    with deadline(seconds, Output.of(args)):
        hints = owner_hints(config)
        pipeline = Pipeline(
            long_lived=windowed,
            cached=False,
            log_failures=False,
            owner_hints=None if hints is None else hints.known,
            owners_for_findings=True,  # only the owners its findings name (owner_needs.py)
        )
        state = _poll(config, pipeline)
    findings = list(state.findings)
    current = list(state.snapshots)
    code = worst_exit_code(findings)
    unpolled = [s.netns for s in current if not s.source_ok("netns") and s.sockets is None]
    unknown = None
    if unpolled and code < EXIT_CRITICAL:
        # A namespace asked for but not audited: the result is not OK, it is unknown.
        unknown = f"namespaces not audited: {', '.join(unpolled)}"
        log.warning("%s", unknown)
        code = EXIT_UNKNOWN
    write_report(
        config, args, findings, current, None, unknown, None if hints is None else hints.origin
    )
    return code


def _poll(config: Config, pipeline: Pipeline) -> ExportState:
    """One poll, or two --window apart."""
    try:
        state = usable(config, pipeline.poll(config))
        if config.check_window > 0:
            if sys.stderr.isatty():  # a person waiting: say why nothing happens yet
                print(
                    f"tcpwatch: watching the kernel counters for {config.check_window:g} s "
                    "(--window 0 for an instant audit) ...",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(config.check_window)
            state = usable(config, pipeline.poll(config))
    finally:
        pipeline.close()
    return state


TIMEOUT_MARGIN = 25.0  # seconds the default --timeout gives beyond the window: polls, startup
FROM_TIMEOUT = 30.0  # the default --timeout of check --from: as a check with the default window


def timeout_of(args: argparse.Namespace, window: float) -> float:
    """The whole check's time limit: -t/--timeout, else the window plus TIMEOUT_MARGIN."""
    if args.timeout is None:
        return window + TIMEOUT_MARGIN
    if not 1 <= args.timeout <= 3600:
        raise UsageError(f"-t/--timeout: expected seconds between 1 and 3600, got {args.timeout:g}")
    if args.timeout <= window:
        raise UsageError(
            f"-t/--timeout: {args.timeout:g} s leaves no time after the {window:g} s window; "
            "give more, or a shorter --window"
        )
    return float(args.timeout)


@contextlib.contextmanager
def deadline(seconds: float, output: Output) -> Iterator[None]:
    """Within this block, the check ends UNKNOWN once ``seconds`` have passed, whatever it is
    doing: a poll blocked on a read, a daemon that answers slowly. Like a check_* plugin's
    alarm, the handler says so (stdout, and stderr for another reader) and exits at once,
    without waiting for threads that may be stuck (SIGALRM; the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        say_unknown(output, [f"the check did not finish within {seconds:g} s (-t/--timeout)"])
        if isinstance(sys.stderr, HeldStderr):
            sys.stderr.release()
        os._exit(EXIT_UNKNOWN)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def threshold_flags(config: Config, args: argparse.Namespace, catalogue: RuleCatalogue) -> Config:
    """``config`` with the rule thresholds of -w/--warning and -c/--critical over its own."""
    changes: dict[str, dict[str, float | None]] = {}
    for flag, name, items in (
        ("-w/--warning", "warning", args.warning),
        ("-c/--critical", "critical", args.critical),
    ):
        for part in (part for item in items or () for part in item.split(",")):
            rule_id, value = _threshold(flag, name, part, catalogue)
            changes.setdefault(rule_id, {})[name] = value
    if not changes:
        return config
    if args.from_url is not None:
        raise UsageError(
            "-w/-c: not with --from (the daemon's thresholds apply: set them in its config)"
        )
    rules = dict(config.rules)
    for rule_id, values in changes.items():
        old = rules.get(rule_id, RuleOverride())
        rules[rule_id] = RuleOverride(old.enabled, {**old.thresholds, **values})
    return replace(config, rules=rules)


def _threshold(flag: str, name: str, part: str, catalogue: RuleCatalogue) -> tuple[str, float]:
    rule, equals, text = (word.strip() for word in part.partition("="))
    if not equals or not rule or not text:
        raise UsageError(f"{flag}: expected RULE=VALUE such as Q01=0.9, got {show(part)}")
    rule_id = rule.upper()
    if rule_id not in catalogue:
        raise UsageError(f"{flag}: unknown rule {show(rule)} (tcpwatch rules lists them)")
    thresholds = catalogue[rule_id]
    if name not in thresholds:
        known = ", ".join(thresholds) or "none"
        raise UsageError(
            f"{flag}: {rule_id} has no {name} threshold (its thresholds: {known}); set those "
            f"as rules.{rule_id}.NAME in the configuration file"
        )
    low, high, unit = thresholds[name]
    percent = text.endswith("%") and unit == "ratio"
    value = parse_seconds(text[:-1] if percent else text)  # a plain non-negative number
    if value is not None and percent:
        value /= 100
    if value is None or not low <= value <= high:
        raise UsageError(
            f"{flag}: {rule_id}={show(text)[1:-1]}: expected a number between {low:g} and "
            f"{high:g} ({unit}{', or a percentage' if unit == 'ratio' else ''})"
        )
    return rule_id, value


def write_report(
    config: Config,
    args: argparse.Namespace,
    findings: Sequence[Finding],
    snapshots: Sequence[Snapshot],
    document: dict[str, Any] | None,
    unknown: str | None = None,
    owners: OwnersOrigin | None = None,
) -> None:
    """Write check's report as asked: the sysctl snippet, JSON, or text with perfdata.
    ``unknown``: why the check is incomplete (its status is then UNKNOWN); ``owners``: what
    the local daemon was asked about the owners (None: it was not)."""
    from tcpwatch.render.json import render_json
    from tcpwatch.render.scope import Scope
    from tcpwatch.render.status import Gauges
    from tcpwatch.render.text import perfdata, render_text

    if args.emit_sysctl:
        from tcpwatch.render.sysctl_snippet import render_sysctl_snippet

        sys.stdout.write(render_sysctl_snippet(findings))
        if unknown is not None:
            sys.stdout.write(f"# TCPWATCH UNKNOWN - {terminal(unknown)}\n")
    elif args.format == "json" and document is not None:
        import json

        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif args.format == "json":
        scope = Scope(_enabled_rules(config), config.check_window, "", _owner_privileges(), owners)
        sys.stdout.write(
            render_json(findings, snapshots, config.check_window, config.docs_url, unknown, scope)
        )
    else:
        if args.color == "auto":
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        else:
            color = args.color == "always"
        # From a daemon, the gauges come with its report: the bare snapshots have no tables.
        gauges = None if document is None else Gauges.from_json(document.get("gauges"))
        shown = ""  # the daemon a report came from (--from): the client only for that
        if document is not None:
            from tcpwatch.client import parse_daemon_url

            shown = parse_daemon_url(args.from_url).shown
        perf = perfdata(findings, snapshots, fill_levels(config), gauges)
        scope = Scope(
            _enabled_rules(config),
            config.check_window if document is None else document["window_seconds"],
            shown,
            _owner_privileges(),
            owners,
        )
        text = render_text(
            findings, snapshots, color, args.verbose, config.docs_url, perf, unknown, scope
        )
        sys.stdout.write(text)
    sys.stdout.flush()


@dataclass(frozen=True, slots=True)
class Output:
    """What check was asked to print: --format and --emit-sysctl."""

    json: bool = False
    sysctl: bool = False

    @classmethod
    def of(cls, args: argparse.Namespace) -> Output:
        return cls(getattr(args, "format", "text") == "json", bool(getattr(args, "emit_sysctl", 0)))


def command_in(words: Sequence[str]) -> str | None:
    """The command of a command line that could not be parsed: its first word that is not an
    option (no top-level option takes a value)."""
    return next((word for word in words if not word.startswith("-")), None)


def output_in(words: Sequence[str]) -> Output:
    """What a check command line that could not be parsed asked to print, as far as it tells."""
    pairs = zip(words, [*words[1:], ""], strict=True)
    json_format = any(
        word == "--format=json" or (word == "--format" and after == "json") for word, after in pairs
    )
    return Output(json_format, "--emit-sysctl" in words)


def same_reader() -> bool:
    """Whether stdout and stderr reach one reader: a terminal, or one pipe as Icinga 2 gives a
    plugin (it merges both into the plugin output). Then an UNKNOWN is said once, on stdout, and
    nothing may come before the status line, which a monitoring core reads as the state."""
    try:
        out, err = os.fstat(1), os.fstat(2)
    except OSError:
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


class HeldStderr(io.StringIO):
    """stderr for a check whose stdout and stderr share one pipe: what logging and warnings write
    waits here and follows the report (as long output), so the status line stays first."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            self.real.write(self.getvalue())
            self.real.flush()
        self.seek(0)
        self.truncate()


def say_unknown(output: Output, lines: Sequence[str]) -> None:
    """An UNKNOWN check: the status line (from the first of ``lines``) on stdout, then every line
    on stderr as ``tcpwatch: ...`` unless stdout already told the same reader the first one."""
    more = len(lines) - 1
    write_unknown(output, lines[0] + (f" (and {more} more problems on stderr)" if more else ""))
    shown = lines[1:] if same_reader() else lines
    with contextlib.suppress(OSError, ValueError):
        for line in shown:
            print(f"tcpwatch: {line}", file=sys.stderr, flush=True)


def write_unknown(output: Output, message: str) -> None:
    """check's stdout when it could not be done: ``TCPWATCH UNKNOWN - <message>`` (a comment
    in the sysctl snippet), or a JSON report with no finding and the message in ``error``."""
    from tcpwatch.render.json import render_json

    line = f"TCPWATCH UNKNOWN - {terminal(message)}"
    if output.sysctl:
        text = f"# {line}\n"
    elif output.json:
        text = render_json([], [], 0.0, unknown=message)
    else:
        text = line + "\n"
    with contextlib.suppress(OSError):  # stdout closed: stderr has the message already
        sys.stdout.write(text)
        sys.stdout.flush()


_CAP_DAC_READ_SEARCH, _CAP_SYS_PTRACE = 2, 19


def _owner_privileges() -> bool:
    """Whether this process holds what names other users' socket owners (CapEff)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            line = next(line for line in status if line.startswith("CapEff:"))
        effective = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return os.geteuid() == 0
    wanted = (1 << _CAP_DAC_READ_SEARCH) | (1 << _CAP_SYS_PTRACE)
    return effective & wanted == wanted


def _enabled_rules(config: Config) -> int:
    from tcpwatch.rules import RULES

    return sum(1 for rule in RULES if config.rules.get(rule.id, RuleOverride()).enabled)


def fill_levels(config: Config) -> tuple[float | None, float | None]:
    """Q01's warning and critical accept-queue fill ratios in effect: perfdata's warn and crit."""
    from tcpwatch.rules import RULES

    q01 = next((rule for rule in RULES if rule.id == "Q01"), None)
    if q01 is None:
        return (None, None)
    override = config.rules.get("Q01")
    values = q01.threshold_values(override.thresholds if override else {})
    return (values.get("warning"), values.get("critical"))


def check_from(config: Config, args: argparse.Namespace) -> int:
    """`check --from URL`: the daemon's latest findings, reported as `check` reports its own.

    Nothing in the daemon's answer is printed as it came: its findings are checked field by
    field, the status and exit code are computed here from their severities, and the JSON
    report is written anew from what was checked."""
    from tcpwatch.client import parse_daemon_url, report_from_document
    from tcpwatch.render.json import checked_of, report_document
    from tcpwatch.render.scope import Scope
    from tcpwatch.render.status import status_of

    if args.window is not None:
        raise UsageError("--window: not with --from (the daemon judges its own rules.window)")
    daemon = parse_daemon_url(args.from_url)
    query = {"netns": args.netns} if args.netns and args.netns not in ("all", "self") else {}
    # The request has the whole --timeout (its own deadline names what was slow); the alarm,
    # a second later, is the backstop.
    seconds = timeout_of(args, 0.0) if args.timeout is not None else FROM_TIMEOUT
    with deadline(seconds + 1, Output.of(args)):
        answer = daemon.get_json("/api/v1/findings", {**query, "limit": "10000"}, seconds)
    report = report_from_document(daemon, answer)
    if args.netns and args.netns not in ("all", "self") and not report.snapshots:
        raise UsageError(f'--netns: the daemon at {daemon.shown} polls no namespace "{args.netns}"')
    document = report_document(
        report.findings, report.snapshots, report.window_seconds, docs_url=config.docs_url
    )
    document["gauges"] = report.gauges.to_json()
    document["checked"] = checked_of(
        report.snapshots, Scope(0, report.window_seconds, daemon.shown)
    )
    if report.findings_total is not None and report.findings_total > len(report.findings):
        document["findings_total"] = report.findings_total
    write_report(config, args, report.findings, report.snapshots, document)
    return status_of(report.findings)[1]
