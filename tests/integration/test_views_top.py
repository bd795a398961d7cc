"""`tcpwatch top` in a real terminal: tmux runs it against a daemon watching a known population,
send-keys drives it and capture-pane reads the screen, whose numbers must equal ss; resize and
quit work; batch mode prints one screen; NO_COLOR turns colour off."""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tcpwatch.top.screen import STATE_COLUMNS

from . import populations
from .netns import REPO_ROOT, Netns, run_tcpwatch
from .views import FULL_PORT, ProblemHost, listener_owner, problem_host, ss_counts

pytestmark = pytest.mark.integration
LABELS = {label: state for state, label in STATE_COLUMNS}


class Tmux:
    """A private tmux server (its own socket) with one session running ``command``."""

    def __init__(self, command: str, width: int, height: int, env: dict[str, str]) -> None:
        self.socket = f"tw-top-{secrets.token_hex(4)}"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", str(width),
                  "-y", str(height), f"env -u LINES -u COLUMNS {exports} {command}")  # fmt: skip
        # Without a client tmux may fall back to its default 80x24: set the size explicitly.
        self.tmux("resize-window", "-t", "top", "-x", str(width), "-y", str(height))

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=20,
            check=False,
        )  # fmt: skip

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top").stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "top").returncode == 0

    def wait(self, check: Callable[[str], object], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if check(text):
                return text
            time.sleep(0.2)
        size = self.tmux("display", "-p", "-t", "top", "#{window_width}x#{window_height}").stdout
        raise AssertionError(f"the {size.strip()} screen never showed what was expected:\n{text}")

    def close(self) -> None:
        self.tmux("kill-server")


def screen_states(text: str) -> dict[tuple[str, str], int]:
    """(family, state) -> count from the STATE blocks of a screen (one or several blocks)."""
    counts: dict[tuple[str, str], int] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("STATE "):
            continue
        labels = line.split()[1:]
        for row in lines[index + 1 : index + 4]:
            family, *numbers = row.split()
            if family in ("ipv4", "ipv6") and len(numbers) == len(labels):
                for label, number in zip(labels, numbers, strict=True):
                    counts[(family, LABELS[label])] = int(number)
    return counts


def ss_as_screen(ns: Netns) -> dict[tuple[str, str], int]:
    ss = ss_counts(ns)
    return {(f, s): ss.get((f, s), 0) for f in ("ipv4", "ipv6") for s in LABELS.values()}


def wait_equal_to_ss(tmux: Tmux, host: Netns, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        before = ss_as_screen(host)
        time.sleep(1.5)  # a refresh (every 1 s) after ss was read
        text = tmux.screen()
        if screen_states(text) == before == ss_as_screen(host):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(
                f"screen {screen_states(text)} never equal to ss {before}:\n{text}"
            )


def top_command(setup: ProblemHost, *args: str) -> str:
    argv = setup.viewer.exec_argv(sys.executable, "-m", "tcpwatch", "top", "--from",
                                  setup.auth_url, "-d", "1", *args)  # fmt: skip
    return " ".join(shlex.quote(a) for a in argv)


def test_top_in_tmux_matches_ss_keys_resize_and_quit(tmp_path: Path) -> None:
    with problem_host(tmp_path) as setup:
        rc_file = tmp_path / "top.rc"
        env = {"PYTHONPATH": str(REPO_ROOT), "TERM": "screen-256color"}
        inner = top_command(setup, "--netns", setup.host.name) + f"; echo $? > {rc_file}"
        command = f"sh -c {shlex.quote(inner)}"
        tmux = Tmux(command, 150, 60, env)
        try:
            tmux.wait(lambda t: f"netns {setup.host.name}" in t and "LISTENERS" in t)
            text = wait_equal_to_ss(tmux, setup.host)
            rows = [
                line for line in text.splitlines() if re.match(r"\s+\d+\.\d+\.\d+\.\d+:\d+", line)
            ]
            assert rows[0].split()[:2] == [
                f"127.0.0.1:{FULL_PORT}",
                listener_owner(setup.host, FULL_PORT),
            ]
            assert "CRITICAL Q01 accept-queue-full" in text and "WARNING  S01" in text
            assert "CLOSE_WAIT HOLDERS" in text and "<script>tw[" in text
            assert max(len(line) for line in text.splitlines()) <= 150

            tmux.keys("s")  # sort by SYN queue, then by port
            tmux.wait(lambda t: "LISTENERS by SYN queue" in t)
            tmux.keys("s")
            by_port = tmux.wait(lambda t: "LISTENERS by port" in t)
            first = next(
                line for line in by_port.splitlines() if re.match(r"\s+127\.0\.0\.1:", line)
            )
            assert first.split()[0] == "127.0.0.1:20001"
            tmux.keys("p")
            tmux.wait(lambda t: "PAUSED" in t)
            tmux.keys("p")
            tmux.wait(lambda t: "PAUSED" not in t)
            tmux.keys("n")  # the other namespace the daemon polls: the viewer's own
            tmux.wait(lambda t: f"netns {setup.viewer.name}" in t)
            tmux.keys("n")
            tmux.wait(lambda t: f"netns {setup.host.name}" in t)

            populations.established(setup.host, pairs=7, port=20021)
            changed = wait_equal_to_ss(tmux, setup.host)
            assert (
                screen_states(changed)[("ipv4", "established")]
                == screen_states(text)[("ipv4", "established")] + 14
            )

            tmux.tmux("resize-window", "-t", "top", "-x", "70", "-y", "30")
            narrow = tmux.wait(
                lambda t: sum(1 for ln in t.splitlines() if ln.startswith("STATE ")) >= 2
            )
            assert max(len(line) for line in narrow.splitlines()) <= 70
            assert len(narrow.splitlines()) <= 30 and "q quit" in narrow.splitlines()[-1]
            wait_equal_to_ss(tmux, setup.host)

            tmux.keys("q")
            deadline = time.monotonic() + 10
            while tmux.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not tmux.alive()
            assert rc_file.read_text().strip() == "0"
        finally:
            tmux.close()


def test_top_colours_respect_no_color(tmp_path: Path) -> None:
    with problem_host(tmp_path, auth=False, hostile=False) as setup:
        base = {"PYTHONPATH": str(REPO_ROOT), "TERM": "screen-256color"}
        screens = {}
        for name, env in (("colour", base), ("plain", {**base, "NO_COLOR": "1"})):
            tmux = Tmux(top_command(setup, "--netns", setup.host.name), 150, 50, env)
            try:
                tmux.wait(lambda t: "CRITICAL Q01" in t)
                screens[name] = tmux.screen(escapes=True)
            finally:
                tmux.close()
        assert "\x1b[31m" in screens["colour"] or "\x1b[1;31m" in screens["colour"]
        assert not re.search(r"\x1b\[[0-9;]*3[1-6]m", screens["plain"])

        # Without --from, top reads the local daemon (at the configured listen) when it answers.
        config = tmp_path / "local.yaml"
        config.write_text(f'listen: "127.0.0.1:{setup.served.port}"\n')
        local = run_tcpwatch(
            setup.viewer, "top", "--config", str(config), "--netns", setup.host.name
        )
        assert local.returncode == 0, local.stderr
        assert f"from http://127.0.0.1:{setup.served.port}" in local.stdout.splitlines()[0]
        assert "CRITICAL Q01" in local.stdout


def test_top_batch_prints_one_screen(tmp_path: Path) -> None:
    with problem_host(tmp_path, hostile=False) as setup:
        for _ in range(5):
            before = ss_as_screen(setup.host)
            done = run_tcpwatch(setup.viewer, "top", "--from", setup.auth_url, "--netns",
                                setup.host.name, "-b")  # fmt: skip
            if before == ss_as_screen(setup.host) == screen_states(done.stdout):
                break
            time.sleep(1.5)  # the daemon's poll may predate ss: the next one will not
        assert done.returncode == 0, done.stderr
        assert screen_states(done.stdout) == ss_as_screen(setup.host)
        assert done.stdout.count("tcpwatch top - ") == 1 and "\x1b" not in done.stdout
        assert "q quit" not in done.stdout  # no key help: nothing to press
        # stdout not a terminal: batch without -b too; polling the host itself without a daemon.
        local = run_tcpwatch(setup.host, "top")
        assert local.returncode == 0, local.stderr
        assert local.stdout.splitlines()[0].endswith(" - polling this host")
        assert "source   no daemon listens at http://127.0.0.1:9477: polling" in local.stdout
        assert screen_states(local.stdout)[("ipv4", "close_wait")] == 16
        bad = run_tcpwatch(setup.viewer, "top", "--from", "http://127.0.0.1:1")
        assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
