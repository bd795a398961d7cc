"""Issue 22 item 3, for real: -t/--timeout ends a check that cannot finish (a poll blocked on a
read, here a procfs whose sysctl files are FIFOs nobody writes) with UNKNOWN and a line saying
so, on stdout and stderr, in every format, in bounded time; and -w/-c change what real sockets
are judged (16 CLOSE_WAIT sockets held by one process: silent at S01's default of 50, a warning
with -w S01=10)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tcpwatch.sources.sysctl import SYSCTLS

from . import populations
from .netns import Netns, run_tcpwatch

pytestmark = pytest.mark.integration


def hanging_procfs(root: Path) -> Path:
    """A procfs stand-in whose net/sockstat is a file and whose sysctls are FIFOs: the first
    sysctl read of a poll blocks in open() until a writer comes, which never does."""
    (root / "net").mkdir(parents=True)
    (root / "net" / "sockstat").write_text(
        "sockets: used 0\nTCP: inuse 0 orphan 0 tw 0 alloc 0 mem 0\n"
    )
    for name in SYSCTLS:
        fifo = root / "sys" / Path(*name.split("."))
        fifo.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mkfifo", str(fifo)], check=True, timeout=10)
    return root


def test_the_timeout_ends_a_check_that_hangs(netns: Netns, tmp_path: Path) -> None:
    procfs = str(hanging_procfs(tmp_path / "proc"))
    expected = "the check did not finish within 2 s (-t/--timeout)"
    for output in ((), ("--format", "json"), ("--emit-sysctl",)):
        started = time.monotonic()
        done = run_tcpwatch(netns, "check", "--path.procfs", procfs, "--window", "0", "-t", "2",
                            *output, timeout=60)  # fmt: skip
        took = time.monotonic() - started
        assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
        assert 2 <= took < 20, took  # 2 s and the interpreter's start, on a loaded machine
        assert done.stderr == f"tcpwatch: {expected}\n"
        if output == ("--format", "json"):
            document = json.loads(done.stdout)
            assert (document["status"], document["error"]) == ("UNKNOWN", expected)
        elif output:
            assert done.stdout == f"# TCPWATCH UNKNOWN - {expected}\n"
        else:
            assert done.stdout == f"TCPWATCH UNKNOWN - {expected}\n"
    # The window counts: a window longer than the timeout is refused before anything runs.
    refused = run_tcpwatch(netns, "check", "--window", "5", "-t", "3")
    assert refused.returncode == 3 and "leaves no time after the 5 s window" in refused.stdout


def test_warning_and_critical_flags_judge_real_sockets(netns: Netns, tmp_path: Path) -> None:
    populations.close_wait(netns, count=16, port=20951, process_name="tw-leaky")
    config = tmp_path / "config.yaml"
    config.write_text("collect:\n  attribute_states: [close_wait]\n")
    base = ("check", "--config", str(config), "--window", "0", "--format", "json")
    quiet = run_tcpwatch(netns, *base)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    warned = run_tcpwatch(netns, *base, "-w", "S01=10")
    assert warned.returncode == 1, warned.stdout + warned.stderr
    (s01,) = [f for f in json.loads(warned.stdout)["findings"] if f["id"] == "S01"]
    assert s01["evidence"]["process"] == "tw-leaky" and s01["evidence"]["close_wait_sockets"] == 16
