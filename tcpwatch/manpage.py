"""tcpwatch(1), generated from the argparse parser, so the manual cannot drift from the flags.

    python3 -m tcpwatch.manpage > tcpwatch.1      # the Debian package does this at build time

Commands, their descriptions and every option (metavar, choices, help) come from
:func:`tcpwatch.cli.build_parser`; exit codes from the constants ``tcpwatch.cli`` returns; the
sysctl files from the reader that reads them. Only the prose around them is written here.

Each option is described once: the options several commands share under COMMON OPTIONS, with
the commands they apply to; each command's section holds its own. The header's date is
SOURCE_DATE_EPOCH's (dpkg-buildpackage sets it from debian/changelog), else none: a page built
twice from one source is the same page.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator

from tcpwatch import __version__
from tcpwatch.cli import EXIT_CRITICAL, EXIT_OK, EXIT_UNKNOWN, EXIT_WARNING, build_parser
from tcpwatch.cli_parser import shared_options
from tcpwatch.paths import SYSCTL_DROP_IN_DIRECTORIES, SYSCTL_MAIN_FILE

EXIT_STATUS: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "Success. For check: no finding above info (Nagios OK)."),
    (EXIT_WARNING, "check: at least one warning finding (Nagios WARNING)."),
    (EXIT_CRITICAL, "check: at least one critical finding (Nagios CRITICAL)."),
    (
        EXIT_UNKNOWN,
        "tcpwatch could not run: a bad flag, a bad configuration file, not Linux, netlink "
        "sock_diag unavailable, procfs unreadable, the listen address unusable, --output not "
        "writable; or, for check, a namespace named with --netns could not be audited and "
        "nothing critical was found elsewhere, the daemon of --from could not be read, or "
        "--timeout passed (Nagios UNKNOWN). The reason is one line on stderr; check also "
        "prints TCPWATCH UNKNOWN - <reason> on stdout (a report with status UNKNOWN and the "
        "reason in error with --format json).",
    ),
    (130, "Interrupted (SIGINT)."),
)

FILES: tuple[tuple[str, str], ...] = (
    (
        "/etc/tcpwatch/config.yaml",
        "The configuration file, when given with --config (the systemd unit and the Debian "
        "package do). Every key is optional; flags override it.",
    ),
    (
        "/etc/default/tcpwatch",
        "Extra flags for the systemd service (TCPWATCH_FLAGS), read when the service starts.",
    ),
    (
        "/proc/net/*, /proc/sys/net/*, /proc/*/fd",
        "Where the kernel counters, the tunables and the owners of sockets are read "
        "(--path.procfs moves the whole tree).",
    ),
    (
        ", ".join(f"/{path}/*.conf" for path in SYSCTL_DROP_IN_DIRECTORIES)
        + f", /{SYSCTL_MAIN_FILE}",
        "Persisted sysctl settings, read to find settings a reboot would bring back and "
        "settings that no longer exist; below --path.rootfs (the node's / in a container).",
    ),
    (
        "/var/lib/prometheus/node-exporter/tcpwatch.prom",
        "Where tcpwatch-textfile.service writes metrics --output for Debian's node_exporter.",
    ),
)


def _escape(text: str) -> str:
    """Plain text as troff: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _bold(text: str) -> str:
    return f"\\fB{_escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{_escape(text)}\\fR"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def option_value(action: argparse.Action) -> str | None:
    """What follows the flag: its metavar, its choices, or None for a switch."""
    if action.nargs == 0:
        return None
    if action.metavar is not None:
        return f"[{action.metavar}]" if action.nargs == "?" else str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(choice) for choice in action.choices) + "}"
    return action.dest.upper()


def help_text(action: argparse.Action) -> str:
    """An option's help as --help prints it (argparse's ``%%`` is a percent sign)."""
    return (action.help or "").replace("%%", "%")


def _option(action: argparse.Action, note: str = "") -> list[str]:
    value = option_value(action)
    flags = ", ".join(_bold(flag) for flag in action.option_strings)
    lines = [".TP", flags + (f" {_italic(value)}" if value else ""), _escape(help_text(action))]
    return lines + ([".br", _escape(note)] if note else [])


def _options(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    """The options of ``parser`` but those whose dest is in ``skip``."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest in skip:
            continue
        yield from _option(action)


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole manual page, troff (man macros)."""
    parser = parser or build_parser()
    commands = _subcommands(parser)
    summaries = _command_help(parser)
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (
        f"{datetime.datetime.fromtimestamp(int(epoch), datetime.UTC):%Y-%m-%d}"
        if epoch.isascii() and epoch.isdigit()
        else ""
    )
    shared = shared_options()
    shared_dests = frozenset(action.dest for action, _ in shared) | {"help"}
    lines = [
        '.\\" Generated by python3 -m tcpwatch.manpage from build_parser(): do not edit.',
        f'.TH TCPWATCH 1 "{when}" "tcpwatch {__version__}" "User Commands"',
        ".SH NAME",
        "tcpwatch \\- TCP connection\\-health monitor and Prometheus exporter for Linux",
        ".SH SYNOPSIS",
    ]
    for name in commands:
        lines += [".B tcpwatch", f".B {_escape(name)}", "[\\fIOPTIONS\\fR]", ".br"]
    lines += [".B tcpwatch", "{\\fB\\-\\-help\\fR | \\fB\\-\\-version\\fR}"]
    lines += [".SH DESCRIPTION", _escape(parser.description or "")]
    lines += [
        ".PP",
        _escape(
            "tcpwatch reads the kernel's TCP state through netlink sock_diag and /proc: socket "
            "counts per state, accept-queue and SYN-queue occupancy per listener, the kernel's "
            "overflow and drop counters and the TCP tunables. It turns them into findings, each "
            "with its evidence and the fix, and exports them to Prometheus."
        ),
        ".SH COMMANDS",
    ]
    for name in commands:
        lines += [".TP", _bold(name), _escape(summaries.get(name, ""))]
    lines += [".SH GLOBAL OPTIONS", _escape("Before the command."), *_options(parser)]
    lines += [
        ".SH COMMON OPTIONS",
        _escape("Options several commands take, after the command; each says which."),
    ]
    for action, users in shared:
        lines += _option(action, f"Commands: {', '.join(users)}.")
    for name, sub in commands.items():
        own = list(_options(sub, shared_dests))
        common = [
            flag for action, users in shared if name in users for flag in action.option_strings[:1]
        ]
        lines += [f".SH OPTIONS OF {_escape(name.upper())}", _escape(sub.description or "")]
        if common:
            lines += [".PP", _escape(f"Common options: {', '.join(common)}.")]
        lines += own
    lines += [".SH EXIT STATUS"]
    for code, meaning in EXIT_STATUS:
        lines += [".TP", _bold(str(code)), _escape(meaning)]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        _bold("NO_COLOR"),
        _escape(
            "When set and not empty, check prints no colors, even on a terminal, unless "
            "--color=always; top prints none either."
        ),
        ".TP",
        _bold("COLUMNS"),
        _escape("The width of top's batch mode when -w gives none (then 512 when not set)."),
        ".TP",
        _bold("SSL_CERT_FILE"),
        _escape(
            "The CA certificates check --from and top --from verify an HTTPS daemon with "
            "(default: the system's)."
        ),
        ".TP",
        _bold("TCPWATCH_FLAGS"),
        _escape("Read by the systemd unit from /etc/default/tcpwatch, appended to its command."),
        ".SH FILES",
    ]
    for path, meaning in FILES:
        lines += [".TP", _italic(path), _escape(meaning)]
    lines += [
        ".SH EXAMPLES",
        ".TP",
        _bold("tcpwatch check --verbose"),
        _escape("Audit this host once; every finding with its evidence and fix."),
        ".TP",
        _bold("tcpwatch check --window 0 --emit-sysctl"),
        _escape(
            "An instant audit, printed as one /etc/sysctl.d snippet of every sysctl fix, each "
            "with its reason."
        ),
        ".TP",
        _bold("tcpwatch check -t 20 -w Q01=90% -c Q01=100% -w S01=100"),
        _escape(
            "As a Nagios or NRPE plugin: at most 20 seconds, the accept-queue fill and the "
            "CLOSE_WAIT count per process judged at the monitoring core's thresholds."
        ),
        ".TP",
        _bold("tcpwatch top -b -w 200 --from https://oncall:secret@10.0.0.5:9477"),
        _escape("One screen of a remote daemon's view, 200 columns wide."),
        ".TP",
        _bold("tcpwatch rules Q01"),
        _escape("The page of rule Q01, read from the copy installed with tcpwatch."),
        ".TP",
        _bold("tcpwatch check --netns all --format json"),
        _escape("Audit every network namespace (containers, pods), as JSON."),
        ".TP",
        _bold("tcpwatch serve --config /etc/tcpwatch/config.yaml"),
        _escape("Run the exporter on :9477, as the systemd unit does."),
        ".TP",
        _bold("tcpwatch metrics --output /var/lib/prometheus/node-exporter/tcpwatch.prom"),
        _escape("One snapshot for node_exporter's textfile collector, written atomically."),
        ".SH SEE ALSO",
        "\\fBss\\fR(8), \\fBnstat\\fR(8), \\fBsysctl\\fR(8), \\fBsystemd.service\\fR(5), "
        "\\fBprometheus\\-node\\-exporter\\fR(1)",
        ".PP",
        _escape(
            "The rule pages, metrics and configuration reference: /usr/share/doc/tcpwatch/ "
            "(Debian package) or docs/ in the tcpwatch source; each rule's page: "
            "tcpwatch rules ID, or /rules/ID on a running tcpwatch serve."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
