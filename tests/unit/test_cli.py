"""The command line: how tcpwatch fails (one line per problem, exit 3, never a traceback), what
`tcpwatch rules` and `--help` print, and the check pipeline from config to exit code.

Failures are run as real processes (``python -m tcpwatch ...``): the exit code is the one a
Nagios or systemd supervisor sees, and stderr is everything the operator would read. The check
pipeline is driven through ``tcpwatch.cli.main`` with the kernel replaced by built snapshots
(``tcpwatch.snapshot.poll`` patched), so the result does not depend on this host's sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import tcpwatch.snapshot as snapshot_source
from tcpwatch.cli import EXIT_UNKNOWN, build_parser, main
from tcpwatch.config import CollectSettings
from tcpwatch.model import Snapshot
from tcpwatch.paths import ProcPaths
from tcpwatch.rules import RULES
from tests.unit.plugin_output import assert_unknown_stdout
from tests.unit.snapshots import (
    NGINX,
    T0,
    T1,
    carried_owners,
    counters_plus,
    listener,
    snapshot,
    socket_table,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 60.0
ALL_RULE_IDS = tuple(rule.id for rule in RULES)  # the registry's; test_rules_engine pins them


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tcpwatch ARGS`` from this checkout, as an operator would run it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("NO_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "tcpwatch", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=str(REPO_ROOT),
        env=env,
        check=False,
    )


def usage_error(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Assert tcpwatch refused to run the way it must, and return its stderr lines.

    Exit 3 (Nagios UNKNOWN), on stdout only check's UNKNOWN status (a JSON or exposition reader
    must not get half a report), and every stderr line a ``tcpwatch: ...`` message: no
    traceback, no log noise.
    """
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == EXIT_UNKNOWN, output
    assert_unknown_stdout(list(result.args)[3:], result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines, output
    assert all(line.startswith("tcpwatch: ") for line in lines), output
    return lines


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- configuration errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules:\n  Q99:\n    warning: 0.5\n", "rules.Q99: unknown rule id (known: C01, "),
        (
            "rules:\n  Q01:\n    warning: high\n",
            'rules.Q01.warning: expected a number between 0.01 and 1, got "high"',
        ),
        (
            "rules:\n  Q01:\n    warning: 1.5\n",
            "rules.Q01.warning: expected a number between 0.01 and 1, got 1.5",
        ),
        ("rules:\n  S01:\n    warn: 10\n", "rules.S01.warn: unknown setting for rule S01"),
        ("bogus: 1\n", "bogus: unknown key (known: "),
        ("check:\n  window: 900\n", "check.window: expected a number between 0 and 300 seconds"),
        ("rules: [\n  Q01: {\n", "line 3: not valid YAML: "),
    ],
    ids=[
        "unknown-rule-id",
        "wrong-threshold-type",
        "threshold-out-of-range",
        "unknown-threshold",
        "unknown-top-level-key",
        "check-window-out-of-range",
        "malformed-yaml",
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    config = write(tmp_path / "tcpwatch.yaml", text)
    (line,) = usage_error(run_cli("check", "--config", config, "--format", "json", "--window", "0"))
    assert line.startswith(f"tcpwatch: {config}: {message}"), line


@pytest.mark.parametrize(
    "command",
    [["check", "--window", "0"], ["metrics"], ["rules"], ["serve", "--listen", "127.0.0.1:1"]],
    ids=["check", "metrics", "rules", "serve"],
)
def test_every_command_refuses_a_bad_config(tmp_path: Path, command: list[str]) -> None:
    config = write(tmp_path / "tcpwatch.yaml", "rules:\n  Q01:\n    warning: high\n")
    (line,) = usage_error(run_cli(*command, "--config", config))
    assert line.startswith(f"tcpwatch: {config}: rules.Q01.warning: "), line


def test_several_config_errors_are_all_reported(tmp_path: Path) -> None:
    config = write(
        tmp_path / "tcpwatch.yaml",
        "bogus: 1\n"
        "check:\n  window: -1\n"
        "rules:\n"
        "  Q99: false\n"
        "  Q01:\n    warning: high\n    critical: 7\n"
        "  S01:\n    nope: 3\n",
    )
    lines = usage_error(run_cli("check", "--config", config, "--format", "json"))
    paths = sorted(line.split(": ")[2] for line in lines)
    assert paths == sorted(
        [
            "bogus",
            "check.window",
            "rules.Q99",
            "rules.Q01.warning",
            "rules.Q01.critical",
            "rules.S01.nope",
        ]
    ), lines
    assert all(line.startswith(f"tcpwatch: {config}: ") for line in lines), lines


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    (line,) = usage_error(run_cli("check", "--config", str(missing), "--window", "0"))
    assert (
        line
        == f"tcpwatch: {missing}: cannot read the configuration file: No such file or directory"
    )


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    (line,) = usage_error(run_cli("check", "--config", str(tmp_path), "--window", "0"))
    assert line.startswith(f"tcpwatch: {tmp_path}: cannot read the configuration file: "), line


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# r\xe9glages\ninterval: 10\n".encode("latin-1"))
    (line,) = usage_error(run_cli("check", "--config", str(config), "--window", "0"))
    assert line.startswith(f"tcpwatch: {config}: "), line
    assert "UTF-8" in line, line


# -- flag errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["abc", "", "-1", "300.5", "nan", "inf"])
def test_bad_window(window: str) -> None:
    (line,) = usage_error(run_cli("check", "--format", "json", f"--window={window}"))
    assert "--window" in line, line


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        (["check", "--bogus"], "--bogus"),
        (["--bogus", "check", "--window", "0"], "--bogus"),
        (["check", "--window", "0", "surplus"], "surplus"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
        (["check", "--format", "xml"], "--format"),
        (["check", "--log-level", "loud"], "--log-level"),
        (["check", "--window"], "--window"),
        (["serve", "--interval", "0"], "--interval"),
        (["serve", "--interval", "soon"], "--interval"),
    ],
    ids=[
        "unknown-check-flag",
        "unknown-global-flag",
        "extra-argument",
        "unknown-command",
        "no-command",
        "bad-format",
        "bad-log-level",
        "flag-without-value",
        "interval-out-of-range",
        "interval-not-a-number",
    ],
)
def test_bad_flags(flags: list[str], mentions: str) -> None:
    (line,) = usage_error(run_cli(*flags))
    assert mentions in line, line


@pytest.mark.parametrize("netns", [",", " , "])
def test_bad_netns_selection(netns: str) -> None:
    (line,) = usage_error(run_cli("check", "--window", "0", "--netns", netns))
    assert line.startswith("tcpwatch: --netns: "), line


def test_netns_that_matches_nothing() -> None:
    (line,) = usage_error(run_cli("check", "--window", "0", "--netns", "tw-no-such-ns-4d1c"))
    assert "--netns" in line, line


@pytest.mark.parametrize("flag", ["--config", "--procfs", "--netns"])
def test_empty_flag_value_is_an_error(flag: str) -> None:
    (line,) = usage_error(run_cli("check", "--window", "0", "--format", "json", f"{flag}="))
    assert flag in line, line


def test_procfs_that_is_not_a_directory_of_proc(tmp_path: Path) -> None:
    for procfs in (tmp_path, tmp_path / "absent", Path("/etc/hostname")):
        (line,) = usage_error(run_cli("check", "--window", "0", "--procfs", str(procfs)))
        assert line.startswith(f"tcpwatch: {procfs} does not look like a procfs mount"), line


def test_procfs_with_a_bogus_sockstat(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "sockstat").write_text("not a sockstat\n")
    lines = usage_error(
        run_cli("check", "--window", "0", "--format", "json", "--procfs", str(tmp_path))
    )
    assert any(str(tmp_path) in line for line in lines), lines


def test_closed_stdout_is_not_a_traceback() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with subprocess.Popen(
        [sys.executable, "-m", "tcpwatch", "rules"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO_ROOT),
        env=env,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader went away before tcpwatch wrote anything
        stderr = process.stderr.read()
        process.wait(timeout=RUN_TIMEOUT)
    assert "Traceback" not in stderr, stderr


# -- what tcpwatch prints --------------------------------------------------------------------------


def test_rules_lists_every_rule_with_its_thresholds() -> None:
    result = run_cli("rules")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# rules.window = 60 (seconds): serve judges rising counters")
    headers = [line for line in lines if not line.startswith((" ", "#"))]
    assert [line.split()[0] for line in headers] == sorted(ALL_RULE_IDS)
    for rule in RULES:
        (header,) = [line for line in headers if line.split()[0] == rule.id]
        assert header.split()[1:3] == [rule.slug, rule.severity], header
        assert header.endswith(rule.title), header
        for threshold in rule.thresholds:
            default = "unset" if threshold.default is None else f"{threshold.default:g}"
            expected = f"rules.{rule.id}.{threshold.name} = {default} ({threshold.unit}): "
            (line,) = [line for line in lines if line.strip().startswith(expected)]
            assert line.strip().endswith(threshold.description), line
    pages = [line.strip() for line in lines if line.strip().startswith("page: ")]
    assert pages == [f"page: tcpwatch rules {rule.id}" for rule in RULES]  # no published copy
    threshold_lines = [line for line in lines if line.startswith(" ") and "page: " not in line]
    assert len(threshold_lines) == sum(len(rule.thresholds) for rule in RULES)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("tcpwatch has no subcommands")


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


# What each --help must mention at the least (a flag dropped from the parser must be noticed).
REQUIRED_FLAGS: dict[str, set[str]] = {
    "": {"--help", "--version", "metrics", "check", "serve", "rules"},
    "check": {
        "--help",
        "--config",
        "--procfs",
        "--path.procfs",
        "--path.rootfs",
        "--netns",
        "--log-level",
        "--log.level",
        "--log.format",
        "--docs-url",
        "--window",
        "--format",
        "--verbose",
        "--color",
        "--emit-sysctl",
    },
    "metrics": {"--help", "--config", "--procfs", "--netns", "--log-level", "--output"},
    "serve": {
        "--help",
        "--config",
        "--listen",
        "--web.listen-address",
        "--interval",
        "--web-config",
        "--web.config.file",
        "--netns",
    },
    "rules": {"--help", "--config", "--format"},
}


@pytest.mark.parametrize("command", REQUIRED_FLAGS, ids=lambda c: c or "top-level")
def test_help_mentions_every_flag(command: str) -> None:
    parser = build_parser()
    subcommands = _subcommands(parser)
    if command:
        expected = _flags(subcommands[command]) | REQUIRED_FLAGS[command]
        result = run_cli(command, "--help")
    else:
        expected = _flags(parser) | set(subcommands) | REQUIRED_FLAGS[command]
        result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    missing = sorted(flag for flag in expected if flag not in result.stdout)
    assert not missing, f"`tcpwatch {command} --help` does not mention {missing}"
    if command in ("", "check"):
        text = " ".join(result.stdout.split())
        assert "3" in text and "could not run" in text, "the exit codes are explained"


# -- the check pipeline, kernel replaced by built snapshots ----------------------------------------


class FakePoll:
    """Stands in for tcpwatch.snapshot.poll: returns the given snapshots, one per call."""

    def __init__(self, *rounds: Snapshot) -> None:
        self.rounds = list(rounds)
        self.calls = 0

    def __call__(
        self,
        settings: CollectSettings,
        selection: tuple[str, ...] = ("self",),
        paths: ProcPaths | None = None,
        *more: Any,
        **keywords: Any,
    ) -> tuple[Snapshot, ...]:
        snapshot_now = self.rounds[min(self.calls, len(self.rounds) - 1)]
        self.calls += 1
        return (snapshot_now,)


def run_main(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    poll: FakePoll,
    args: Sequence[str],
) -> tuple[int, dict[str, Any], str]:
    monkeypatch.setattr(snapshot_source, "poll", poll)
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    code = main(["check", "--format", "json", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    report: dict[str, Any] = json.loads(captured.out)
    assert report["exit_code"] == code
    return code, report, captured.err


def capped_listener() -> Snapshot:
    """somaxconn 128 and a listener cut to it with a 78 % full queue: K05 and Q03, not Q01."""
    return snapshot(
        sysctl_overrides={"net.core.somaxconn": (128,)},
        sockets=socket_table([listener(8080, queue_length=100, queue_max=128, inode=7001)]),
        owners={7001: NGINX},
    )


def ids(report: dict[str, Any]) -> list[str]:
    return [finding["id"] for finding in report["findings"]]


class TestCheckPipeline:
    def test_findings_and_exit_code(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, report, _ = run_main(
            monkeypatch, capsys, FakePoll(capped_listener()), ["--window", "0"]
        )
        assert (code, report["status"]) == (1, "WARNING")
        assert sorted(ids(report)) == ["K05", "Q03"]
        (q03,) = [f for f in report["findings"] if f["id"] == "Q03"]
        assert q03["subject"] == "0.0.0.0:8080"
        assert (q03["evidence"]["process"], q03["evidence"]["pid"]) == ("nginx", 1234)

    @pytest.mark.parametrize("body", ["Q03: false", "Q03:\n    enabled: false"])
    def test_disabled_rule_is_absent_from_the_output(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
        body: str,
    ) -> None:
        config = write(tmp_path / "tcpwatch.yaml", f"rules:\n  {body}\n")
        code, report, _ = run_main(
            monkeypatch, capsys, FakePoll(capped_listener()), ["--window", "0", "--config", config]
        )
        assert ids(report) == ["K05"]
        assert code == 1

    def test_everything_disabled_is_ok(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        config = write(tmp_path / "tcpwatch.yaml", "rules:\n  Q03: false\n  K05: false\n")
        code, report, _ = run_main(
            monkeypatch, capsys, FakePoll(capped_listener()), ["--window", "0", "--config", config]
        )
        assert (code, report["status"], report["findings"]) == (0, "OK", [])

    def test_critical_finding_exits_2(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        full = snapshot(
            sockets=socket_table([listener(8080, queue_length=129, queue_max=128, inode=7001)]),
            owners={7001: NGINX},
        )
        code, report, _ = run_main(monkeypatch, capsys, FakePoll(full), ["--window", "0"])
        assert (code, report["status"], ids(report)) == (2, "CRITICAL", ["Q01"])

    def test_window_takes_two_snapshots_and_sees_counters_move(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        start = snapshot(taken_at=T0)
        end = snapshot(
            taken_at=T1,
            counters=counters_plus({"TcpExtListenOverflows": 20, "TcpExtListenDrops": 20}),
        )
        poll = FakePoll(start, end)
        code, report, _ = run_main(monkeypatch, capsys, poll, ["--window", "0.01"])
        assert poll.calls == 2
        assert (code, ids(report)) == (1, ["Q02"])
        assert report["findings"][0]["evidence"]["listen_overflows_in_window"] == 20
        # Without a window the same end state shows nothing moving.
        code, report, _ = run_main(monkeypatch, capsys, FakePoll(end), ["--window", "0"])
        assert (code, ids(report)) == (0, [])

    def test_bad_config_returns_3_before_polling(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        poll = FakePoll(capped_listener())
        monkeypatch.setattr(snapshot_source, "poll", poll)
        monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
        config = write(tmp_path / "tcpwatch.yaml", "rules:\n  Q01:\n    warning: high\n  Q99: 1\n")
        assert main(["check", "--config", config]) == EXIT_UNKNOWN
        captured = capsys.readouterr()
        assert captured.out == (
            f"TCPWATCH UNKNOWN - {config}: rules.Q01.warning: expected a number between 0.01 "
            'and 1, got "high" (and 1 more problems on stderr)\n'
        )
        known = ", ".join(sorted(ALL_RULE_IDS))
        assert captured.err.splitlines() == [
            f"tcpwatch: {config}: rules.Q01.warning: "
            'expected a number between 0.01 and 1, got "high"',
            f"tcpwatch: {config}: rules.Q99: unknown rule id (known: {known})",
        ]
        assert poll.calls == 0


class FakeFleetPoll:
    """tcpwatch.snapshot.poll for --netns: a healthy namespace and one that could not be entered."""

    def __init__(self, entered: Snapshot) -> None:
        self.entered = entered

    def __call__(self, *args: Any, **keywords: Any) -> tuple[Snapshot, ...]:
        from dataclasses import replace as replace_fields

        from tcpwatch.model import SourceStatus

        refused = SourceStatus("netns", False, 0.001, "entering needs CAP_SYS_ADMIN")
        unentered = replace_fields(
            self.entered,
            netns="blue",
            sockets=None,
            counters=None,
            sockstat=None,
            sysctls=None,
            attribution=None,
            sources=(refused,),
        )
        return (self.entered, unentered)


def test_a_namespace_that_could_not_be_audited_makes_check_unknown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(snapshot_source, "poll", FakeFleetPoll(snapshot()))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    code = main(["check", "--format", "json", "--window", "0", "--netns", "host,blue"])
    captured = capsys.readouterr()
    assert code == EXIT_UNKNOWN
    assert "namespaces not audited: blue" in captured.err
    report = json.loads(captured.out)
    assert report["findings"] == []
    # The report says UNKNOWN too, with why, as the exit code does.
    assert (report["status"], report["exit_code"]) == ("UNKNOWN", 3)
    assert report["error"] == "namespaces not audited: blue"
    main(["check", "--window", "0", "--netns", "host,blue"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("TCPWATCH UNKNOWN - namespaces not audited: blue | critical=0")
    assert {"netns": "blue", "name": "netns", "ok": False}.items() <= next(
        s for s in report["sources"] if s["netns"] == "blue"
    ).items()


def test_critical_findings_outrank_an_unaudited_namespace(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    full = snapshot(
        sockets=socket_table([listener(8080, queue_length=129, queue_max=128, inode=7001)]),
        owners={7001: NGINX},
    )
    monkeypatch.setattr(snapshot_source, "poll", FakeFleetPoll(full))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    assert main(["check", "--format", "json", "--window", "0", "--netns", "host,blue"]) == 2
    capsys.readouterr()
