"""Command line: `tcpwatch metrics | check | top | rules | serve`.

Exit codes (docs/cli.md): 0 success / OK; 1 WARNING and 2 CRITICAL findings (`check`, Nagios
convention); 3 tcpwatch could not run: bad flag, bad config, not Linux, no netlink, unreadable
procfs. Errors a user can cause print one line to stderr, never a traceback; `check` prints its
UNKNOWN status on stdout first, and the stderr line only where another reader sees stderr
(cli_check.py: a terminal or Icinga's merged pipe is told once).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from tcpwatch.cli_check import (
    HeldStderr,
    Output,
    check,
    check_from,
    command_in,
    output_in,
    require_linux,
    same_reader,
    say_unknown,
    threshold_flags,
    usable,
)
from tcpwatch.cli_parser import (
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_WARNING,
    FLAG_NAMES,
    ArgumentsError,
    build_parser,
)
from tcpwatch.config import Config, ConfigError, RuleCatalogue, load_config, parse_namespaces
from tcpwatch.errors import UsageError, describe_error
from tcpwatch.escape import terminal
from tcpwatch.logformat import setup_logging
from tcpwatch.validation import show

__all__ = ["EXIT_CRITICAL", "EXIT_OK", "EXIT_UNKNOWN", "EXIT_WARNING", "build_parser", "main"]

log = logging.getLogger("tcpwatch")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    held = None
    if command_in(words) == "check" and same_reader() and not sys.stderr.isatty():
        # One pipe for both (Icinga 2): the status line must come first, so stderr waits.
        held = sys.stderr = HeldStderr(sys.stderr)
    try:
        return _main(words)
    finally:
        if held is not None:
            sys.stderr = held.real
            held.release()


def _main(words: list[str]) -> int:
    try:
        args = build_parser().parse_args(words)
    except ArgumentsError as error:
        if command_in(words) == "check":
            say_unknown(output_in(words), [str(error)])
        else:
            print(f"tcpwatch: {error}", file=sys.stderr)
        return EXIT_UNKNOWN
    level = getattr(args, "log_level", None) or "info"
    log_format = getattr(args, "log_format", None) or "logfmt"
    setup_logging(level, log_format)
    try:
        return _run(args)
    except UsageError as error:
        # Messages may quote a daemon's answer or a host's name: escaped, one line whatever it is.
        message = terminal(str(error))
        if args.command == "check":
            say_unknown(Output.of(args), [message])
        else:
            print(f"tcpwatch: {message}", file=sys.stderr)
        return EXIT_UNKNOWN
    except ConfigError as error:
        if args.command == "check":
            say_unknown(Output.of(args), list(error.errors))
        else:
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
    except Exception as error:
        if args.command != "check":
            raise
        # A bug. For a monitoring core a traceback and exit 1 would read as WARNING: the check
        # could not be done, so UNKNOWN, with the traceback on stderr for the bug report.
        say_unknown(Output.of(args), [f"internal error: {describe_error(error)} (a bug)"])
        traceback.print_exc()
        return EXIT_UNKNOWN


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    level = getattr(args, "log_level", None) or "info"
    log_format = getattr(args, "log_format", None) or "logfmt"
    if (config.log_level, config.log_format) != (level, log_format):
        setup_logging(config.log_level, config.log_format)
    if args.command == "rules":
        from tcpwatch.cli_rules import rules_command

        return rules_command(config, args)
    if args.command == "check" and args.from_url is not None:
        return check_from(config, args)
    if args.command == "top":
        return _top(config, args)
    require_linux(config.procfs)
    if args.command == "metrics":
        return _metrics(config, args.output)
    if args.command == "check":
        return check(config, args)
    if args.command == "serve":
        from tcpwatch.daemon import serve

        return serve(config, lambda: _load(args))
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
    if args.command == "check":
        config = threshold_flags(config, args, rule_catalogue())
    if args.command == "serve":
        # Checked here, not at bind time, so a bad address is refused by a reload (SIGHUP) too.
        from tcpwatch.http.listen import ListenError, parse_listen

        try:
            parse_listen(config.listen)
        except ListenError as error:
            raise UsageError(str(error)) from None
    return config


def _metrics(config: Config, output: str | None) -> int:
    from tcpwatch.pipeline import Pipeline
    from tcpwatch.render.prometheus import render

    pipeline = Pipeline(long_lived=False, cached=False, log_failures=False)
    state = usable(config, pipeline.poll(config))
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


def _top(config: Config, args: argparse.Namespace) -> int:
    from tcpwatch.top.app import run_top
    from tcpwatch.top.feed import open_feed

    if not 0.2 <= args.delay <= 3600:
        raise UsageError(f"--delay: expected seconds between 0.2 and 3600, got {args.delay:g}")
    if args.from_url is None:
        require_linux(config.procfs)
    feed = open_feed(config, args.from_url)
    single = args.netns if args.netns and "," not in args.netns and "*" not in args.netns else None
    return run_top(feed, single if single not in ("self", "all") else None, args.sort,
                   args.delay, args.batch, args.width)  # fmt: skip
