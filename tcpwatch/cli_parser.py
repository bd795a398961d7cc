"""The command line's grammar: every command and flag of `tcpwatch`, and the exit codes.

Flags follow node_exporter's conventions (``--web.listen-address``, ``--path.procfs``,
``--log.level`` ...); the names tcpwatch used before (``--listen``, ``--procfs``,
``--log-level``, ``--web-config``) stay as aliases of the same option. Abbreviations are off on
every parser: ``--windo 3`` is an error, not a guess that changes meaning when a flag is added.
The man page and the shell completions are generated from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
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


class ArgumentsError(Exception):
    """The command line is wrong: one line for stderr (`main` prints it; exit 3, UNKNOWN)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        # argparse exits 2, which Nagios reads as CRITICAL: a bad flag is UNKNOWN (3), and
        # `check` says so on stdout too, so main() reports it. The message echoes the value
        # given: one bounded line whatever it was.
        line = one_line(message, 4 * MAX_SHOWN_CHARS)
        raise ArgumentsError(f"{line} (see tcpwatch --help)")


def _seconds(text: str) -> float:
    """argparse type of the flags taking seconds: ``15``, ``15s``, ``1m``, ``100ms``, ``1h30m``."""
    seconds = parse_seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(
            f'expected seconds or a duration such as "15s", "1m", "100ms", got {show(text)}'
        )
    return seconds


MIN_COLUMNS, MAX_COLUMNS = 40, 512  # top -w: procps top's maximum width


def _columns(text: str) -> int:
    """argparse type of top's -w: a width in columns."""
    if not text.isascii() or not text.isdigit() or not MIN_COLUMNS <= int(text) <= MAX_COLUMNS:
        raise argparse.ArgumentTypeError(
            f"expected columns from {MIN_COLUMNS} to {MAX_COLUMNS}, got {show(text)}"
        )
    return int(text)


def _configuration() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument_group("configuration").add_argument(
        "--config", metavar="FILE", help="YAML configuration file"
    )
    return options


def _host() -> _Parser:
    options = _Parser(add_help=False)
    group = options.add_argument_group("the host to read")
    group.add_argument(
        "--path.procfs",
        "--procfs",
        dest="procfs",
        metavar="DIR",
        help="procfs mount point (default /proc; config: procfs)",
    )
    group.add_argument(
        "--path.rootfs",
        dest="rootfs",
        metavar="DIR",
        help="the host's root filesystem, for its /etc/sysctl.conf and sysctl.d files (default "
        "/; config: rootfs); in a container, where the node's / is mounted, e.g. /host. No "
        "--path.sysfs: tcpwatch reads nothing from /sys",
    )
    group.add_argument(
        "--netns",
        metavar="WHICH",
        help='network namespaces to poll: "self" (default), "all", or comma-separated names '
        'or patterns such as "host,pod:default/*" (config: namespaces; needs CAP_SYS_ADMIN)',
    )
    return options


def _logging() -> _Parser:
    options = _Parser(add_help=False)
    group = options.add_argument_group("logging")
    group.add_argument(
        "--log.level",
        "--log-level",
        dest="log_level",
        choices=LOG_LEVELS,
        help="log verbosity on stderr (default info; config: log_level; debug shows tracebacks "
        "of failing sources)",
    )
    group.add_argument(
        "--log.format",
        dest="log_format",
        choices=LOG_FORMATS,
        help="log line format on stderr: logfmt (key=value, quoted) or json, one record a line "
        "(default logfmt; config: log_format)",
    )
    return options


def _docs() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument_group("rule pages").add_argument(
        "--docs-url",
        dest="docs_url",
        metavar="URL",
        help="where your site publishes the docs; findings and `rules` then link "
        "<URL>/docs/rules/<page>.md (default none: `tcpwatch rules ID` prints a page, serve "
        "shows it at /rules/ID; config: docs_url)",
    )
    return options


# Options several commands share, each with the commands it means something to: `rules` polls
# nothing (no --netns, no procfs), and only `check` and `rules` print rule pages' URLs.
SHARED: tuple[tuple[Callable[[], _Parser], tuple[str, ...]], ...] = (
    (_configuration, ("metrics", "check", "serve", "top", "rules")),
    (_host, ("metrics", "check", "serve", "top")),
    (_logging, ("metrics", "check", "serve", "top")),
    (_docs, ("check", "rules")),
)


def _parents(command: str) -> list[_Parser]:
    return [make() for make, commands in SHARED if command in commands]


def shared_options() -> list[tuple[argparse.Action, tuple[str, ...]]]:
    """Each shared option once, with the commands it applies to (for the man page)."""
    return [
        (action, commands)
        for make, commands in SHARED
        for action in make()._actions
        if action.option_strings
    ]


def _add_check(commands: argparse._SubParsersAction[_Parser]) -> None:
    check = commands.add_parser(
        "check",
        parents=_parents("check"),
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
        "-t",
        "--timeout",
        type=_seconds,
        metavar="DURATION",
        help="give up after this long, whatever is running (polls, the window, a daemon's "
        "answer), with UNKNOWN and a line saying so, as every check_* plugin does: seconds or "
        '"30s", "1m" (default: the window plus 25 s, 30 s with the default window)',
    )
    check.add_argument(
        "-w",
        "--warning",
        action="append",
        metavar="RULE=VALUE[,...]",
        help="a rule's warning threshold for this run, over the config's: Q01=0.9 or Q01=90%% "
        "(accept-queue fill), S01=100 (CLOSE_WAIT sockets one process holds); any rule with a "
        "warning threshold (tcpwatch rules lists them); repeatable",
    )
    check.add_argument(
        "-c",
        "--critical",
        action="append",
        metavar="RULE=VALUE[,...]",
        help="a rule's critical threshold for this run: Q01=1.0 or Q01=100%% (a full accept "
        "queue), S01=200 (stale CLOSE_WAIT sockets of one process, judged by a daemon's history)"
        "; any rule with a critical threshold; repeatable",
    )
    check.add_argument(
        "--emit-sysctl",
        action="store_true",
        help="instead of the report, print one /etc/sysctl.d snippet with every sysctl fix the "
        "findings propose, each with its reason (exit status as for the report)",
    )


def _add_serve(commands: argparse._SubParsersAction[_Parser]) -> None:
    serve = commands.add_parser(
        "serve",
        parents=_parents("serve"),
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


def _add_top(commands: argparse._SubParsersAction[_Parser]) -> None:
    top = commands.add_parser(
        "top",
        parents=_parents("top"),
        help="live terminal view: states, listeners by fill, CLOSE_WAIT holders, findings",
        description="A live view like top(1), from a running daemon (--from, default the local "
        "one when its listener can be verified as tcpwatch's, run by root, you or "
        "tcpwatch.service) or by polling this host; the title says which. Keys: q quit, n next "
        "namespace, s sort listeners, p pause, r refresh. Batch mode prints one screen and "
        "exits.",
    )
    top.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="a running `tcpwatch serve` (http[s]://[USER:PASS@]HOST:PORT), read as it is; "
        "default: the local daemon (config listen) when its listening socket belongs to root, "
        "you or tcpwatch.service and a tcpwatch process holds it, else poll this host",
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
        "-w",
        "--width",
        type=_columns,
        nargs="?",
        const=0,
        metavar="COLUMNS",
        help="output width, as procps top's -w: batch mode prints lines this wide (at most "
        f"{MAX_COLUMNS}); -w alone takes COLUMNS, else {MAX_COLUMNS}. Default in batch mode: "
        f"COLUMNS, else the terminal's width, else {MAX_COLUMNS}; on a terminal the screen's "
        "width, which -w can only narrow",
    )
    top.add_argument(
        "--sort",
        choices=("fill", "syn_recv", "port"),
        default="fill",
        help="listener order (default fill: the fullest accept queue first; key s cycles)",
    )


def build_parser() -> argparse.ArgumentParser:
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
        parents=_parents("metrics"),
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
    _add_check(commands)
    _add_serve(commands)
    _add_top(commands)
    rules = commands.add_parser(
        "rules",
        parents=_parents("rules"),
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
