"""Issue 22 item 3: the flags a monitoring core's command line tunes. -w/--warning and
-c/--critical set a rule's thresholds for one run (over the config file's), the perfdata levels
follow them; -t/--timeout is checked against the window. The timeout itself, against a poll that
hangs and a daemon that drips, is tests/integration/test_check_timeout.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tcpwatch.snapshot as snapshot_source
from tcpwatch.cli import main
from tests.unit.plugin_output import assert_unknown_stdout
from tests.unit.snapshots import NGINX, carried_owners, listener, snapshot, socket_table
from tests.unit.test_cli import FakePoll

# An accept queue 85 % full: Q01 warns at 0.8 by default, and is critical from 1.0.
FILLING = snapshot(
    sockets=socket_table([listener(8080, queue_length=435, queue_max=511, inode=7001)]),
    owners={7001: NGINX},
)


def check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, str]:
    monkeypatch.setattr(snapshot_source, "poll", FakePoll(FILLING))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    capsys.readouterr()
    code = main(["check", "--window", "0", *flags])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "code", "levels"),
    [
        ((), 1, "80;100"),
        (("-w", "Q01=0.9"), 0, "90;100"),
        (("--warning", "q01=90%"), 0, "90;100"),
        (("-c", "Q01=0.85"), 2, "80;85"),
        (("-w", "Q01=50%", "-c", "Q01=84%"), 2, "50;84"),
        (("-w", "Q01=0.5,S01=10", "-c", "Q01=0.99"), 1, "50;99"),
    ],
)
def test_warning_and_critical_set_the_rule_and_the_perfdata_levels(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    code: int,
    levels: str,
) -> None:
    got, out = check(monkeypatch, capsys, *flags)
    assert got == code, out
    assert f"accept_queue_fill=85.1%;{levels};0;100" in out.splitlines()[0]


def test_the_flags_win_over_the_config_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "tcpwatch.yaml"
    config.write_text("rules:\n  Q01: {warning: 0.95, critical: 0.99}\n")
    assert check(monkeypatch, capsys, "--config", str(config))[0] == 0
    assert check(monkeypatch, capsys, "--config", str(config), "-w", "Q01=0.8")[0] == 1
    monkeypatch.setattr(snapshot_source, "poll", FakePoll(FILLING))
    monkeypatch.setattr(snapshot_source, "attribute", carried_owners)
    capsys.readouterr()
    assert main(["check", "--window", "0", "--format", "json", "-w", "Q01=0.9"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "OK"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("-w", "Q99=1"), 'unknown rule "Q99"'),
        (("-w", "K05=1"), "K05 has no warning threshold (its thresholds: minimum)"),
        (("-w", "Q01=2"), "Q01=2: expected a number between 0.01 and 1 (ratio, or a percentage)"),
        (("-w", "S01=50%"), "S01=50%: expected a number between 1 and 1e+07 (sockets)"),
        (("-c", "Q01"), 'expected RULE=VALUE such as Q01=0.9, got "Q01"'),
        (("-c", "Q01=\x1b[2J"), "Q01=\\x1b[2J: expected a number"),
        (("--from", "http://127.0.0.1:1", "-w", "Q01=0.5"), "-w/-c: not with --from"),
        (("-t", "3", "--window", "5"), "3 s leaves no time after the 5 s window"),
        (("-t", "0.5"), "expected seconds between 1 and 3600, got 0.5"),
        (("-t", "soon"), 'expected seconds or a duration such as "15s"'),
    ],
)
def test_wrong_flags_are_one_line_and_unknown(
    capsys: pytest.CaptureFixture[str], flags: tuple[str, ...], message: str
) -> None:
    argv = ["check", *flags]
    capsys.readouterr()
    assert main(argv) == 3
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and message in err, err
    assert_unknown_stdout(argv, out, err)


@pytest.mark.parametrize(
    "flags",
    [["--config", "/nonexistent/tcpwatch.yaml"], ["-c", "Q01=5"], ["--window", "1", "-t", "1"]],
)
def test_one_pipe_for_stdout_and_stderr_gets_the_status_line_first_and_once(
    flags: list[str],
) -> None:
    """Icinga 2 reads a plugin's stdout and stderr from one pipe: the status line must be its
    first line (the state's text), and the problem is not said twice."""
    run = subprocess.run(
        [sys.executable, "-m", "tcpwatch", "check", "--window", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    lines = run.stdout.splitlines()
    assert run.returncode == 3
    assert lines and lines[0].startswith("TCPWATCH UNKNOWN - "), run.stdout
    assert not any(line.startswith("tcpwatch: ") for line in lines), run.stdout
