"""The command line's grammar: every command and flag of `tcpwatch`, and the exit codes.

Flags follow node_exporter's conventions (``--web.listen-address``, ``--path.procfs``,
``--log.level`` ...); the names tcpwatch used before (``--listen``, ``--procfs``,
``--log-level``, ``--web-config``) stay as aliases of the same option. Abbreviations are off on
every parser: ``--windo 3`` is an error, not a guess that changes meaning when a flag is added.
The man page and the shell completions are generated from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from tcpwatch import __version__
from tcpwatch.logformat import LOG_FORMATS, LOG_LEVELS
from tcpwatch.validation import MAX_SHOWN_CHARS, one_line, parse_seconds, show

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_CRITICAL = 2
EXIT_UNKNOWN = 3

# dest -> the flag named in messages (the node_exporter name, then the older alias).
FLAG_NAMES = {
    "config": "--config",
    "procfs": "--path.procfs (--procfs)",
    "rootfs": "--path.rootfs",
    "netns": "--netns",
    "listen": "--web.listen-address (--listen)",
    "web_config": "--web.config.file (--web-config)",
    "docs_url": "--docs-url",
    "output": "--output",
}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

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


def _common() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML configuration file")
    common.add_argument(
        "--path.procfs",
        "--procfs",
        dest="procfs",
        metavar="DIR",
        help="procfs mount point (default /proc; config: procfs)",
    )
    common.add_argument(
        "--path.rootfs",
        dest="rootfs",
        metavar="DIR",
        help="the host's root filesystem, for its /etc/sysctl.conf and sysctl.d files (default "
        "/; config: rootfs); in a container, where the node's / is mounted, e.g. /host. No "
        "--path.sysfs: tcpwatch reads nothing from /sys",
    )
    common.add_argument(
        "--netns",
        metavar="WHICH",
        help='network namespaces to poll: "self" (default), "all", or comma-separated names '
        'or patterns such as "host,pod:default/*" (config: namespaces; needs CAP_SYS_ADMIN)',
    )
    common.add_argument(
        "--log.level",
        "--log-level",
        dest="log_level",
        choices=LOG_LEVELS,
        help="log verbosity on stderr (default info; config: log_level; debug shows tracebacks "
        "of failing sources)",
    )
    common.add_argument(
        "--log.format",
        dest="log_format",
        choices=LOG_FORMATS,
        help="log line format on stderr: logfmt (key=value, quoted) or json, one record a line "
        "(default logfmt; config: log_format)",
    )
    common.add_argument(
        "--docs-url",
        dest="docs_url",
        metavar="URL",
        help="where your site publishes the docs; findings and `rules` then link "
        "<URL>/docs/rules/<page>.md (default none: `tcpwatch rules ID` prints a page, serve "
        "shows it at /rules/ID; config: docs_url)",
    )
    return common


def _add_check(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    check = commands.add_parser(
        "check",
        parents=[common],
        help="audit this host once and exit with a Nagios status",
        description="Take a snapshot, wait --window seconds, take another, evaluate every rule "
        "and print the findings; the first line carries Nagios perfdata after '|'. Exit 0 OK, "
        "1 warning, 2 critical, 3 could not run.",
    )
    check.add_argument(
        "--window",
        type=_seconds,
        metavar="DURATION",
        help="time between the two snapshots, so counters can be seen moving: seconds or "
        '"5s", "1m" (default 5s; config: check.window; 0 = one snapshot, an instant audit)',
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
    check.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="text format: ANSI colours (default auto: when stdout is a terminal and NO_COLOR "
        "is not set)",
    )
    check.add_argument(
        "--emit-sysctl",
        action="store_true",
        help="instead of the report, print one /etc/sysctl.d snippet with every sysctl fix the "
        "findings propose, each with its reason (exit status as for the report)",
    )


def _add_serve(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the exporter: poll on an interval, serve /metrics (default :9477)",
        description="Poll on its own interval and serve the latest snapshot and findings to "
        "Prometheus. SIGHUP reloads --config; SIGTERM/SIGINT stop it.",
    )
    serve.add_argument(
        "--web.listen-address",
        "--listen",
        dest="listen",
        metavar="[ADDRESS]:PORT",
        help='address to serve on (default ":9477"; config: listen)',
    )
    serve.add_argument(
        "--interval",
        type=_seconds,
        metavar="DURATION",
        help='time between polls: seconds or "15s", "1m" (default 15s; config: interval)',
    )
    serve.add_argument(
        "--web.config.file",
        "--web-config",
        dest="web_config",
        metavar="FILE",
        help="exporter-toolkit web config file: TLS and basic auth (config: web_config)",
    )


def _add_top(commands: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    common = _common()
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
    _add_check(commands, common)
    _add_serve(commands, common)
    _add_top(commands, common)
    rules = commands.add_parser(
        "rules",
        parents=[common],
        help="list the rule catalogue, or print one rule's page",
        description="List every rule: id, slug, default severity, title, thresholds and the "
        "page's URL. With --config, the thresholds in effect (overrides marked) and which rules "
        "are disabled. With a rule ID (Q01) or slug, print that rule's page, read offline.",
    )
    rules.add_argument(
        "rule", nargs="?", metavar="ID", help="a rule id or slug (Q01, accept-queue-full)"
    )
    rules.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (default text)"
    )
    return parser
