"""Issue 22 item 2: every way `tcpwatch check` ends UNKNOWN prints its status on stdout, in every
output (text, JSON, the sysctl snippet), as the monitoring-plugins guidelines ask: Nagios and
NRPE showed "(No output ...)" for `--netns nosuch`, `--config /nonexistent`, an unreachable
`--from`, with exit 3 and an empty stdout."""

from __future__ import annotations

from typing import Any

import pytest

import tcpwatch.pipeline as pipeline_module
from tcpwatch.cli import main
from tests.unit.plugin_output import assert_unknown_stdout

OUTPUTS = ([], ["--format", "json"], ["--format=json"], ["--emit-sysctl"])
FAILURES = {
    "bad flag": ["--bogus"],
    "bad value": ["--color", "purple"],
    "no config file": ["--config", "/nonexistent/tcpwatch.yaml"],
    "no such namespace": ["--netns", "nosuch", "--window", "0"],
    "unreachable daemon": ["--from", "http://127.0.0.1:1"],
    "bad daemon URL": ["--from", "ftp://x"],
    "window out of range": ["--window", "999"],
    "no procfs": ["--path.procfs", "/nonexistent", "--window", "0"],
}


def run(capsys: pytest.CaptureFixture[str], argv: list[str], bug: bool = False) -> str:
    capsys.readouterr()
    assert main(argv) == 3
    out, err = capsys.readouterr()
    if bug:  # the traceback is for the bug report: on stderr, after the message
        assert "Traceback" in err and "Traceback" not in out
        err = ""
    else:
        assert "Traceback" not in err
        assert_unknown_stdout(argv, out, err)
    return out


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: " ".join(o) or "text")
@pytest.mark.parametrize("failure", FAILURES)
def test_every_unknown_path_prints_a_status(
    capsys: pytest.CaptureFixture[str], failure: str, output: list[str]
) -> None:
    out = run(capsys, ["check", *FAILURES[failure], *output])
    assert out.strip(), "stdout must not be empty"
    if output == []:
        assert out.startswith("TCPWATCH UNKNOWN - ")


def test_an_internal_error_is_unknown_not_warning(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("poll exploded")

    monkeypatch.setattr(pipeline_module.Pipeline, "poll", broken)
    for output in OUTPUTS:
        out = run(capsys, ["check", "--window", "0", *output], bug=True)
        assert "internal error: poll exploded (a bug)" in out and "UNKNOWN" in out


def test_other_commands_keep_stdout_clean(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["metrics", "--bogus"], ["rules", "--config", "/nonexistent"], ["top", "-d", "0"]):
        capsys.readouterr()
        assert main(argv) == 3
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("tcpwatch: ")
