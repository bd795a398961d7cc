"""What `tcpwatch check` must print on stdout when it cannot be done (issue 22 item 2): the
monitoring-plugins guidelines want a status line, so Nagios shows why and not "(No output)"."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tcpwatch.cli_check import command_in, output_in


def assert_unknown_stdout(argv: Sequence[str], stdout: str, stderr: str) -> None:
    """``stdout`` is what an UNKNOWN exit of ``tcpwatch ARGV`` must print: nothing for other
    commands; for `check`, one ``TCPWATCH UNKNOWN - <the first stderr message>`` line, its JSON
    report with that ``error``, or that line as a comment of the sysctl snippet."""
    errors = [line.removeprefix("tcpwatch: ") for line in stderr.splitlines()]
    if command_in(argv) != "check":
        assert stdout == "", stdout
        return
    assert errors, stderr
    output = output_in(argv)
    if output.json and not output.sysctl:
        document = json.loads(stdout)
        assert (document["status"], document["exit_code"]) == ("UNKNOWN", 3), document
        assert document["error"].startswith(errors[0]), (document["error"], errors)
        assert document["findings"] == [], document
        return
    assert stdout.count("\n") == 1 and stdout.endswith("\n"), stdout
    line = stdout.rstrip("\n")
    if output.sysctl:
        assert line.startswith("# "), line
        line = line[2:]
    assert line.startswith(f"TCPWATCH UNKNOWN - {errors[0]}"), (line, errors)
