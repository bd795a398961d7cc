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
from typing import Any, NoReturn

from tcpwatch import __version__
from tcpwatch.config import Config, ConfigError, RuleCatalogue, load_config, parse_namespaces
from tcpwatch.errors import UsageError
from tcpwatch.paths import procfs_problem
from tcpwatch.state import ExportState
from tcpwatch.validation import MAX_SHOWN_CHARS, one_line, parse_seconds, show

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_CRITICAL = 2
EXIT_UNKNOWN = 3

log = logging.getLogger("tcpwatch")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2, which Nagios reads as CRITICAL: a bad flag is UNKNOWN (3). The
        # message echoes the value given: one bounded line whatever it was.
        line = one_line(message, 4 * MAX_SHOWN_CHARS)
        self.exit(EXIT_UNKNOWN, f"tcpwatch: {line} (see tcpwatch --help)\n")


def _seconds(text: str) -> float:
    """argparse type of the flags taking seconds: ``15``, ``15s``, ``1m``, ``100ms``, ``1h30m``."""
    seconds = parse_seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(
            f'expected seconds or a duration such as "15s", "1m", "100ms", got {show(text)}'
        )
    return seconds


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML configuration file")
    common.add_argument(
        "--procfs", metavar="DIR", help="procfs mount point (default /proc; config: procfs)"
    )
    common.add_argument(
        "--netns",
        metavar="WHICH",
        help='network namespaces to poll: "self" (default), "all", or comma-separated names '
        'or patterns such as "host,pod:default/*" (config: namespaces; needs CAP_SYS_ADMIN)',
    )
    common.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity on stderr (default info; debug shows tracebacks of failing sources)",
    )
    parser = _Parser(
        prog="tcpwatch",
        description="TCP connection-health monitor for Linux: is TCP healthy on this host, "
        "and if not, what exactly do I change?",
        epilog="Exit codes: 0 OK, 1 warning, 2 critical (check), 3 tcpwatch could not run.",
    )
    parser.add_argument("--version", action="version", version=f"tcpwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    metrics = commands.add_parser(
        "metrics",
        parents=[common],
        help="take one snapshot and print the Prometheus exposition (or write it to --output)",
        description="Take one snapshot and print the Prometheus exposition text to stdout, or "
        "write it atomically to --output for node_exporter's textfile collector. Only tcpwatch_* "
        "series: no process_* or python_info (node_exporter exports its own process_*).",
    )
    metrics.add_argument(
        "--output",
        metavar="FILE",
        help="write to FILE atomically (temporary file in the same directory, fsync, rename), "
        "e.g. /var/lib/prometheus/node-exporter/tcpwatch.prom",
    )
    check = commands.add_parser(
        "check",
        parents=[common],
        help="audit this host once and exit with a Nagios status",
        description="Take a snapshot, wait --window seconds, take another, evaluate every rule "
        "and print the findings. Exit 0 OK, 1 warning, 2 critical, 3 could not run.",
    )
    check.add_argument(
        "--window",
        type=_seconds,
        metavar="DURATION",
        help="time between the two snapshots, so counters can be seen moving: seconds or "
        '"5s", "1m" (default 5s; config: check.window; 0 = one snapshot)',
    )
    check.add_argument(
        "--format", choices=("text", "json"), default="text", help="report format (default text)"
    )
    check.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="read the findings of a running `tcpwatch serve` (http[s]://[USER:PASS@]HOST:PORT) "
        "from its /api/v1/findings instead of polling: its history included, no --window",
    )
    check.add_argument(
        "--verbose",
        action="store_true",
        help="text format: show evidence and fixes of info findings too (they are one line each)",
    )
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the exporter: poll on an interval, serve /metrics (default :9477)",
        description="Poll on its own interval and serve the latest snapshot and findings to "
        "Prometheus. SIGHUP reloads --config; SIGTERM/SIGINT stop it.",
    )
    serve.add_argument(
        "--listen", metavar="[ADDRESS]:PORT", help='address to serve on (default ":9477")'
    )
    serve.add_argument(
        "--interval",
        type=_seconds,
        metavar="DURATION",
        help='time between polls: seconds or "15s", "1m" (default 15s; config: interval)',
    )
    serve.add_argument(
        "--web-config",
        metavar="FILE",
        help="exporter-toolkit web config file: TLS and basic auth (config: web_config)",
    )
    top = commands.add_parser(
        "top",
        parents=[common],
        help="live terminal view: states, listeners by fill, CLOSE_WAIT holders, findings",
        description="A live view like top(1), from a running daemon (--from, default the local "
        "one when it answers) or by polling this host. Keys: q quit, n next namespace, s sort "
        "listeners, p pause, r refresh. Batch mode prints one screen and exits.",
    )
    top.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="a running `tcpwatch serve` (http[s]://[USER:PASS@]HOST:PORT); default: the local "
        "daemon (config listen) if it answers, else poll this host",
    )
    top.add_argument(
        "-d",
        "--delay",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 2)",
    )
    top.add_argument(
        "-b",
        "--batch",
        action="store_true",
        help="print one plain screen and exit (automatic when stdout is not a terminal)",
    )
    top.add_argument(
        "--sort",
        choices=("fill", "syn_recv", "port"),
        default="fill",
        help="listener order (default fill: the fullest accept queue first; key s cycles)",
    )
    commands.add_parser(
        "rules",
        parents=[common],
        help="list the rule catalogue",
        description="List every rule: id, slug, default severity, title, thresholds.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None)
    _setup_logging(level or "info")
    try:
        config = _load(args)
        if config.log_level != (level or "info"):
            _setup_logging(config.log_level)
        if args.command == "rules":
            return _rules()
        if args.command == "check" and args.from_url is not None:
            return _check_from(args)
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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        format="level=%(levelname)s msg=%(message)s",
        level=level.upper(),
        force=True,
    )


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

    for flag in ("config", "procfs", "netns", "listen", "web_config", "output"):
        value = getattr(args, flag, None)
        if value == "":
            raise UsageError(f"--{flag.replace('_', '-')}: empty value (an unset variable?)")
        if value is not None and "\0" in value:
            raise UsageError(f"--{flag.replace('_', '-')}: contains a NUL byte: {show(value)}")
    config = (
        load_config(args.config, rule_catalogue(), disableable_sources())
        if args.config
        else Config()
    )
    changes: dict[str, Any] = {}
    if getattr(args, "log_level", None):
        changes["log_level"] = args.log_level
    if getattr(args, "procfs", None):
        changes["procfs"] = args.procfs
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
        raise UsageError(f"{problem}: pass --procfs pointing at a mounted /proc")


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
            "pass --procfs pointing at a mounted /proc"
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
    from tcpwatch.render.json import render_json
    from tcpwatch.render.text import render_text
    from tcpwatch.rules import worst_exit_code

    # With a window, the long-lived sources hear what happens during it.
    windowed = config.check_window > 0
    pipeline = Pipeline(long_lived=windowed, cached=False, log_failures=False)
    try:
        state = _usable(config, pipeline.poll(config))
        if windowed:
            time.sleep(config.check_window)
            state = _usable(config, pipeline.poll(config))
    finally:
        pipeline.close()
    findings = list(state.findings)
    current = list(state.snapshots)
    if args.format == "json":
        sys.stdout.write(render_json(findings, current, config.check_window))
    else:
        color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
        sys.stdout.write(render_text(findings, current, color, verbose=args.verbose))
    sys.stdout.flush()
    code = worst_exit_code(findings)
    unpolled = [s.netns for s in current if not s.source_ok("netns") and s.sockets is None]
    if unpolled and code < EXIT_CRITICAL:
        # A namespace asked for but not audited: the result is not OK, it is unknown.
        log.warning("namespaces not audited: %s", ", ".join(unpolled))
        return EXIT_UNKNOWN
    return code


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


def _check_from(args: argparse.Namespace) -> int:
    """`check --from URL`: the daemon's latest findings, reported as `check` reports its own."""
    from tcpwatch.client import parse_daemon_url, report_from_document
    from tcpwatch.render.text import render_text

    if args.window is not None:
        raise UsageError("--window: not with --from (the daemon's own poll interval is the window)")
    daemon = parse_daemon_url(args.from_url)
    query = {"netns": args.netns} if args.netns and args.netns not in ("all", "self") else {}
    document = daemon.get_json("/api/v1/findings", {**query, "limit": "10000"})
    findings, snapshots = report_from_document(daemon, document)
    code = int(document["exit_code"])
    if args.netns and args.netns not in ("all", "self") and not snapshots:
        raise UsageError(f'--netns: the daemon at {daemon.shown} polls no namespace "{args.netns}"')
    if args.format == "json":
        import json

        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
        sys.stdout.write(render_text(findings, snapshots, color, verbose=args.verbose))
    sys.stdout.flush()
    return code


def _rules() -> int:
    from tcpwatch.rules import RULES

    for rule in RULES:
        print(f"{rule.id}  {rule.slug:<28} {rule.severity:<8} {rule.title}")
        for threshold in rule.thresholds:
            default = "unset" if threshold.default is None else f"{threshold.default:g}"
            print(
                f"      rules.{rule.id}.{threshold.name} = {default} ({threshold.unit}): "
                f"{threshold.description}"
            )
    return EXIT_OK
