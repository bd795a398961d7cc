"""README's "See it in 30 seconds" block, run as written in a copy of the checkout (issue 22
item 10): the virtualenv line installs tcpwatch, and its `check` line reports on a namespace."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .netns import Netns
from .test_install_script import copy_checkout

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL_SECONDS = 300


def quick_start_commands() -> list[str]:
    """The commands of the first ```sh block after "See it in 30 seconds", comments removed."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1]
    assert quick.lstrip().startswith("**See it in 30 seconds**"), "the 30-second path comes first"
    match = re.search(r"```sh\n(.*?)```", quick, re.S)
    assert match is not None
    commands = [line.split("  #", 1)[0].strip() for line in match.group(1).splitlines()]
    return [command for command in commands if command]


def test_see_it_in_30_seconds_works_as_written() -> None:
    commands = quick_start_commands()
    install, check = commands[0], commands[1]
    assert install.startswith("python3 -m venv ") and check.endswith("tcpwatch check"), commands
    with tempfile.TemporaryDirectory(prefix="tw-readme-") as scratch:
        checkout = copy_checkout(Path(scratch) / "tcpwatch")
        started = time.monotonic()
        # The install needs the package index: it runs on the host, writing only into the copy.
        done = subprocess.run(
            ["bash", "-c", install], cwd=checkout, capture_output=True, text=True,
            timeout=INSTALL_SECONDS, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        installing = time.monotonic() - started
        with Netns() as ns:
            report = ns.run(*shlex.split(check), check=False, timeout=120, cwd=str(checkout))
        assert report.returncode in (0, 1, 2), (report.returncode, report.stderr)
        first = report.stdout.splitlines()[0]
        assert re.match(r"TCPWATCH (OK|WARNING|CRITICAL) - ", first), report.stdout
        assert f"netns {ns.name}: snapshot at" in report.stdout
        # Informational: a slow package index makes the install slow, not wrong.
        print(f"quick start install took {installing:.0f} s", file=sys.stderr)
