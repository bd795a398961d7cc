"""Command line: `tcpwatch metrics | check | top | rules | serve`.

Exit codes (docs/cli.md): 0 success / OK; 1 WARNING and 2 CRITICAL findings (`check`, Nagios
convention); 3 tcpwatch could not run: bad flag, bad config, not Linux, no netlink, unreadable
procfs. Errors a user can cause print one line to stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tcpwatch.cli_parser import (
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_WARNING,
    FLAG_NAMES,
    build_parser,
)
from tcpwatch.config import Config, ConfigError, RuleCatalogue, load_config, parse_namespaces
from tcpwatch.errors import UsageError
from tcpwatch.logformat import setup_logging
from tcpwatch.paths import procfs_problem
from tcpwatch.state import ExportState
from tcpwatch.validation import show

if TYPE_CHECKING:
    from tcpwatch.model import Snapshot
    from tcpwatch.rules.base import Finding

__all__ = ["EXIT_CRITICAL", "EXIT_OK", "EXIT_UNKNOWN", "EXIT_WARNING", "build_parser", "main"]

log = logging.getLogger("tcpwatch")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None) or "info"
    log_format = getattr(args, "log_format", None) or "logfmt"
    setup_logging(level, log_format)
    try:
        config = _load(args)
        if (config.log_level, config.log_format) != (level, log_format):
            setup_logging(config.log_level, config.log_format)
        if args.command == "rules":
            from tcpwatch.cli_rules import rules_command

            return rules_command(config, args)
        if args.command == "check" and args.from_url is not None:
            return _check_from(config, args)
        if args.command == "top":
            return _top(config, args)
        _require_linux(config.procfs)
        if args.command == "metrics":
            return _metrics(config, args.output)
        if args.command == "check":
            return _check(config, args)
        if args.command == "serve":
            from tcpwatch.daemon import serve

            return serve(config, lambda: _load(args))
    except UsageError as error:
        print(f"tcpwatch: {error}", file=sys.stderr)
        return EXIT_UNKNOWN
    except ConfigError as error:
        for line in error.errors:
            print(f"tcpwatch: {line}", file=sys.stderr)
        return EXIT_UNKNOWN
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tcpwatch rules | head -1`): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")


def rule_catalogue() -> RuleCatalogue:
    from tcpwatch.rules import RULES

    return {
        rule.id: {t.name: (t.minimum, t.maximum, t.unit) for t in rule.thresholds} for rule in RULES
    }


def disableable_sources() -> tuple[str, ...]:
    from tcpwatch.sources.registry import registered_sources

    return tuple(source.name for source in registered_sources())


def _load(args: argparse.Namespace) -> Config:
    from dataclasses import replace

    for dest, flag in FLAG_NAMES.items():
        value = getattr(args, dest, None)
        if value == "":
            raise UsageError(f"{flag}: empty value (an unset variable?)")
        if value is not None and "\0" in value:
            raise UsageError(f"{flag}: contains a NUL byte: {show(value)}")
    config = (
        load_config(args.config, rule_catalogue(), disableable_sources())
        if args.config
        else Config()
    )
    changes: dict[str, Any] = {}
    for dest in ("log_level", "log_format", "procfs", "rootfs"):
        if getattr(args, dest, None):
            changes[dest] = getattr(args, dest)
    if getattr(args, "docs_url", None):
        url = args.docs_url
        if not url.startswith(("https://", "http://")) or any(c.isspace() for c in url):
            raise UsageError(
                f"--docs-url: expected an http(s):// URL without spaces, got {show(url)}"
            )
        changes["docs_url"] = url.rstrip("/")
    if getattr(args, "netns", None):
        selection = parse_namespaces(args.netns)
        if selection is None:
            raise UsageError(f'--netns: expected "self", "all" or names, got {show(args.netns)}')
        changes["namespaces"] = selection
    if getattr(args, "listen", None):
        changes["listen"] = args.listen
    if getattr(args, "web_config", None):
        changes["web_config"] = args.web_config
    if getattr(args, "interval", None) is not None:
        if not 1 <= args.interval <= 3600:
            raise UsageError(
                f"--interval: expected seconds between 1 and 3600, got {args.interval:g}"
            )
        changes["interval"] = args.interval
    if getattr(args, "window", None) is not None:
        if not 0 <= args.window <= 300:
            raise UsageError(f"--window: expected seconds between 0 and 300, got {args.window:g}")
        changes["check_window"] = args.window
    config = replace(config, **changes) if changes else config
    if args.command == "serve":
        # Checked here, not at bind time, so a bad address is refused by a reload (SIGHUP) too.
        from tcpwatch.http.listen import ListenError, parse_listen

        try:
            parse_listen(config.listen)
        except ListenError as error:
            raise UsageError(str(error)) from None
    return config


def _require_linux(procfs: str) -> None:
    if not sys.platform.startswith("linux"):
        raise UsageError(
            f"tcpwatch needs Linux (netlink sock_diag and procfs); this is {sys.platform}"
        )
    if (problem := procfs_problem(procfs)) is not None:
        raise UsageError(f"{problem}: pass --path.procfs pointing at a mounted /proc")


def _usable(config: Config, state: ExportState) -> ExportState:
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


def _metrics(config: Config, output: str | None) -> int:
    from tcpwatch.pipeline import Pipeline
    from tcpwatch.render.prometheus import render

    pipeline = Pipeline(long_lived=False, cached=False, log_failures=False)
    state = _usable(config, pipeline.poll(config))
    # A one-shot run's process_* series mean nothing, and node_exporter's textfile collector
    # fails the whole scrape on series it also exports itself ("was collected before").
    exposition = render(state, include_process=False)
    if output is not None:
        from tcpwatch.textfile import write_atomically

        write_atomically(output, exposition)
        return EXIT_OK
    sys.stdout.buffer.write(exposition)
    sys.stdout.flush()
    return EXIT_OK


def _check(config: Config, args: argparse.Namespace) -> int:
    from tcpwatch.pipeline import Pipeline
    from tcpwatch.rules import worst_exit_code

    # With a window, the long-lived sources hear what happens during it.
    windowed = config.check_window > 0
    pipeline = Pipeline(long_lived=windowed, cached=False, log_failures=False)
    try:
        state = _usable(config, pipeline.poll(config))
        if windowed:
            if sys.stderr.isatty():  # a person waiting: say why nothing happens yet
                print(
                    f"tcpwatch: watching the kernel counters for {config.check_window:g} s "
                    "(--window 0 for an instant audit) ...",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(config.check_window)
            state = _usable(config, pipeline.poll(config))
    finally:
        pipeline.close()
    findings = list(state.findings)
    current = list(state.snapshots)
    _report(config, args, findings, current, None)
    code = worst_exit_code(findings)
    unpolled = [s.netns for s in current if not s.source_ok("netns") and s.sockets is None]
    if unpolled and code < EXIT_CRITICAL:
        # A namespace asked for but not audited: the result is not OK, it is unknown.
        log.warning("namespaces not audited: %s", ", ".join(unpolled))
        return EXIT_UNKNOWN
    return code


def _report(
    config: Config,
    args: argparse.Namespace,
    findings: Sequence[Finding],
    snapshots: Sequence[Snapshot],
    document: dict[str, Any] | None,
) -> None:
    """Write check's report as asked: the sysctl snippet, JSON, or text with perfdata."""
    from tcpwatch.render.json import render_json
    from tcpwatch.render.status import Gauges
    from tcpwatch.render.text import perfdata, render_text

    if args.emit_sysctl:
        from tcpwatch.render.sysctl_snippet import render_sysctl_snippet

        sys.stdout.write(render_sysctl_snippet(findings))
    elif args.format == "json" and document is not None:
        import json

        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif args.format == "json":
        sys.stdout.write(render_json(findings, snapshots, config.check_window, config.docs_url))
    else:
        if args.color == "auto":
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        else:
            color = args.color == "always"
        # From a daemon, the gauges come with its report: the bare snapshots have no tables.
        gauges = None if document is None else Gauges.from_json(document.get("gauges"))
        perf = perfdata(findings, snapshots, _fill_levels(config), gauges)
        text = render_text(findings, snapshots, color, args.verbose, config.docs_url, perf)
        sys.stdout.write(text)
    sys.stdout.flush()


def _fill_levels(config: Config) -> tuple[float | None, float | None]:
    """Q01's warning and critical accept-queue fill ratios in effect: perfdata's warn and crit."""
    from tcpwatch.rules import RULES

    q01 = next((rule for rule in RULES if rule.id == "Q01"), None)
    if q01 is None:
        return (None, None)
    override = config.rules.get("Q01")
    values = q01.threshold_values(override.thresholds if override else {})
    return (values.get("warning"), values.get("critical"))


def _top(config: Config, args: argparse.Namespace) -> int:
    from tcpwatch.top.app import run_top
    from tcpwatch.top.feed import open_feed

    if not 0.2 <= args.delay <= 3600:
        raise UsageError(f"--delay: expected seconds between 0.2 and 3600, got {args.delay:g}")
    if args.from_url is None:
        _require_linux(config.procfs)
    feed = open_feed(config, args.from_url)
    single = args.netns if args.netns and "," not in args.netns and "*" not in args.netns else None
    return run_top(feed, single if single not in ("self", "all") else None, args.sort,
                   args.delay, args.batch)  # fmt: skip


def _check_from(config: Config, args: argparse.Namespace) -> int:
    """`check --from URL`: the daemon's latest findings, reported as `check` reports its own."""
    from tcpwatch.client import parse_daemon_url, report_from_document

    if args.window is not None:
        raise UsageError("--window: not with --from (the daemon judges its own rules.window)")
    daemon = parse_daemon_url(args.from_url)
    query = {"netns": args.netns} if args.netns and args.netns not in ("all", "self") else {}
    document = daemon.get_json("/api/v1/findings", {**query, "limit": "10000"})
    findings, snapshots = report_from_document(daemon, document)
    code = int(document["exit_code"])
    if args.netns and args.netns not in ("all", "self") and not snapshots:
        raise UsageError(f'--netns: the daemon at {daemon.shown} polls no namespace "{args.netns}"')
    _report(config, args, findings, snapshots, document)
    return code
