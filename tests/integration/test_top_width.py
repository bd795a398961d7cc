"""Issue 22 item 8: `top -b` cut every line at 132 columns, whatever COLUMNS said, losing the
fix text. Now batch mode is as wide as procps top makes it: -w N; -w alone: COLUMNS, else 512;
no -w: COLUMNS, else the terminal's width (a real tmux pane), else 512 (a file or a pipe gets
whole lines)."""

from __future__ import annotations

import shlex
import sys
import time

import pytest

from . import populations
from .netns import REPO_ROOT, Netns, run_tcpwatch, tcpwatch_env
from .test_views_top import Tmux

pytestmark = pytest.mark.integration
FIX = "is not calling accept()"
FIX_END = "too few workers/threads)"


def top(ns: Netns, *args: str, columns: str | None = None) -> list[str]:
    env = {k: v for k, v in tcpwatch_env().items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    done = ns.run(sys.executable, "-m", "tcpwatch", "top", "-b", *args, check=False,
                  timeout=120, env=env, cwd=str(REPO_ROOT))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def fix_line(lines: list[str]) -> str:
    return next(line for line in lines if FIX in line)


def test_batch_width_follows_w_columns_and_the_terminal(netns: Netns) -> None:
    populations.accept_queue_full(netns, 20961)
    whole = top(netns)  # a pipe, no COLUMNS: up to 512, nothing cut
    assert fix_line(whole).endswith(FIX_END) and len(fix_line(whole)) > 132
    assert max(map(len, whole)) <= 512

    wide = top(netns, columns="250")
    assert fix_line(wide).endswith(FIX_END) and max(map(len, wide)) <= 250
    narrow = top(netns, columns="100")
    assert len(fix_line(narrow)) == 100 and fix_line(narrow).endswith("~")
    assert max(map(len, narrow)) <= 100

    assert max(map(len, top(netns, "-w", "80", columns="250"))) <= 80  # -w N wins
    assert max(map(len, top(netns, "-w", columns="120"))) <= 120  # -w alone: COLUMNS
    assert fix_line(top(netns, "-w"))  # -w alone, no COLUMNS: 512
    assert fix_line(top(netns, "-w")).endswith(FIX_END)

    bad = run_tcpwatch(netns, "top", "-b", "-w", "9999")
    assert bad.returncode == 3 and "expected columns from 40 to 512" in bad.stderr

    # On a terminal, batch mode takes its width: a 90-column tmux pane (tmux drops COLUMNS and
    # LINES), whose text is read back once top has printed and exited.
    argv = netns.exec_argv(sys.executable, "-m", "tcpwatch", "top", "-b")
    command = " ".join(shlex.quote(a) for a in argv) + "; sleep 60"
    tmux = Tmux(command, 90, 80, {"PYTHONPATH": str(REPO_ROOT), "TERM": "screen-256color"})
    try:
        tmux.wait(lambda t: FIX in t and "FINDINGS" in t)
        time.sleep(0.5)
        lines = [line for line in tmux.screen().splitlines() if line]
        assert lines[0].startswith("tcpwatch top - ") and max(map(len, lines)) <= 90
        assert fix_line(lines).endswith("~")  # 90 columns: the fix line is cut, not wrapped
    finally:
        tmux.close()
