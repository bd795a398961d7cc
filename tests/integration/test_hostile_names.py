"""Issue 21 item 2: process and namespace names an unprivileged user chooses, through every text
view. A listener's owner renames itself with prctl(PR_SET_NAME) to ``x\\nrm -rf ~;#`` (a line
that would run in the root shell the fix block is pasted into), a CLOSE_WAIT holder to terminal
escapes (clear screen, set title, bell), and the namespace itself is called ``tw\\x1b[2J...``.
`check` (text and JSON), `top -b`, `check --from` and `top --from` against a real `serve` must
print no control character, no line the name started, and a fix block that bash would run as
exactly the commands tcpwatch means: the same as for plain names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.unit.shell_commands import commands_bash_would_run

from . import populations
from .netns import CommandFailed, Netns, run_tcpwatch
from .test_serve import Served, start_serve

pytestmark = pytest.mark.integration

ATTACK = "x\nrm -rf ~;#"  # 12 bytes: PR_SET_NAME keeps 15
SCREEN = "\x1b[2J\x1b]0;t\x07"  # clear the screen, set the window title, ring the bell
SHOWN_ATTACK = "x\\nrm -rf ~;#"
SHOWN_SCREEN = "\\x1b[2J\\x1b]0;t\\x07"
FULL_PORT = 20801
LEAK_PORT = 20802
SERVE_PORT = 19481
# The programs tcpwatch's fix blocks run; a hostile name must add none.
FIX_PROGRAMS = {
    "ss",
    "ip",
    "nsenter",
    "sysctl",
    "echo",
    "nstat",
    "head",
    "awk",
    "sort",
    "uniq",
    "grep",
}


def assert_escaped(text: str, where: str) -> None:
    assert not {c for c in text if not c.isprintable() and c != "\n"}, (where, text)
    started = [ln for ln in text.splitlines() if ln.lstrip().startswith(("rm ", "rm\t"))]
    assert not started, (where, started)


def assert_fix_runs_only_ours(remediation: str) -> None:
    commands = commands_bash_would_run(remediation)
    assert commands and {c.split()[0] for c in commands} <= FIX_PROGRAMS, commands
    assert not any("rm -rf" in c for c in commands), commands


def wait_ready(served: Served, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert served.process.poll() is None, served.log()
        try:
            if served.get("/-/ready")[0] == 200:
                time.sleep(2.5)  # two polls: the findings have their window
                return
        except CommandFailed:  # not listening yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"serve not ready within {timeout} s")


def test_hostile_names_are_escaped_in_every_text_view(tmp_path: Path) -> None:
    with Netns(prefix="tw\x1b[2J\x07") as ns:
        full = populations.accept_queue_full(ns, FULL_PORT, process_name=ATTACK)
        leak = populations.close_wait(ns, count=8, port=LEAK_PORT, process_name=SCREEN)
        full_pid, leak_pid = full.info["pid"], leak.info["pid"]
        assert full_pid and leak_pid
        config = tmp_path / "config.yaml"
        config.write_text(
            "collect:\n  attribute_states: [close_wait]\nrules:\n  S01: {warning: 5}\n"
        )
        shown_netns = ns.name.replace("\x1b", "\\x1b").replace("\x07", "\\x07")

        text = run_tcpwatch(ns, "check", "--config", str(config), "--window", "0")
        assert text.returncode == 2, text.stderr
        assert_escaped(text.stdout + text.stderr, "check")
        assert f"# {SHOWN_ATTACK}[" in text.stdout and "is not calling accept()" in text.stdout
        assert f"{SHOWN_SCREEN}[" in text.stdout
        assert f"netns {shown_netns}: snapshot" in text.stdout

        # JSON carries the names as they are (JSON escapes them); the fix text is shell text.
        report = run_tcpwatch(ns, "check", "--config", str(config), "--window", "0",
                              "--format", "json")  # fmt: skip
        assert report.returncode == 2, report.stderr
        assert "\x1b" not in report.stdout
        document = json.loads(report.stdout)
        q01 = next(f for f in document["findings"] if f["id"] == "Q01")
        assert q01["evidence"]["process"] == ATTACK and q01["netns"] == ns.name
        assert all(line.isprintable() for line in q01["remediation"].split("\n"))
        assert_fix_runs_only_ours(q01["remediation"])
        s01 = next(f for f in document["findings"] if f["id"] == "S01")
        assert s01["evidence"]["process"] == SCREEN
        assert_fix_runs_only_ours(s01["remediation"])

        top = run_tcpwatch(ns, "top", "-b", "--config", str(config))
        assert top.returncode == 0, top.stderr
        assert_escaped(top.stdout + top.stderr, "top -b")
        assert SHOWN_ATTACK in top.stdout and SHOWN_SCREEN in top.stdout

        served = start_serve(ns, tmp_path / "serve.log", "--listen", f"127.0.0.1:{SERVE_PORT}",
                             "--interval", "1", "--config", str(config))  # fmt: skip
        served.port = SERVE_PORT
        try:
            wait_ready(served)
            url = f"http://127.0.0.1:{SERVE_PORT}"
            remote = run_tcpwatch(ns, "check", "--from", url)
            assert remote.returncode == 2, remote.stderr
            assert_escaped(remote.stdout + remote.stderr, "check --from")
            assert f"# {SHOWN_ATTACK}[{full_pid}]" in remote.stdout
            remote_json = run_tcpwatch(ns, "check", "--from", url, "--format", "json")
            assert remote_json.returncode == 2 and "\x1b" not in remote_json.stdout
            fixes = [f["remediation"] for f in json.loads(remote_json.stdout)["findings"]]
            assert_fix_runs_only_ours(fixes[0])
            remote_top = run_tcpwatch(ns, "top", "-b", "--from", url)
            assert remote_top.returncode == 0, remote_top.stderr
            assert_escaped(remote_top.stdout + remote_top.stderr, "top --from")
            assert f"{SHOWN_ATTACK}[{full_pid}]" in remote_top.stdout
            assert f"{SHOWN_SCREEN}[{leak_pid}]" in remote_top.stdout
        finally:
            served.process.kill()
            served.process.wait(timeout=10)
