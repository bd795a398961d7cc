"""Every benchmark still runs (issue 20 item 5): each one in benchmarks/, on tiny populations for
seconds, so a refactor cannot break one silently. The figures mean nothing here; the full runs
are manual and write docs/performance.md. Each benchmark makes and removes its own namespaces;
each run here is bounded in time, and what they print is checked for their report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .netns import REPO_ROOT, tcpwatch_env

pytestmark = pytest.mark.integration

BENCHMARKS = REPO_ROOT / "benchmarks"

# benchmark -> (arguments for a seconds-long run, text its report must hold)
SMOKE: dict[str, tuple[list[str], str]] = {
    "bench_poll.py": (["--sizes", "1000", "--profile", "server", "--polls", "1",
                       "--polls-ss-p", "1"], "Correctness guard"),
    "bench_serve.py": (["--smoke"], "**vs node_exporter**"),
    "bench_churn.py": (["--pairs", "100", "--polls", "2"], "ss"),
    "bench_lifecycle.py": (["--rates", "500", "--seconds", "1"], "|"),
    "bench_destroy_reader.py": (["--connections", "100", "--rounds", "1"], "recvmmsg"),
    "bench_listener_drops.py": (["--connections", "200", "--rounds", "1"], "ESTABLISHED"),
    "bench_live_info.py": (["--connections", "200", "--rounds", "1", "--scans", "2"],
                           "ESTABLISHED"),
    "bench_netns.py": (["--total", "400", "--counts", "1,2", "--polls", "1",
                        "--hashes", "shared", "--idle", "2"], "| 2 | 0 (idle) |"),
    "bench_owners.py": (["--listeners", "1", "--fds", "16", "--repeats", "2"], "|"),
    "bench_scrape.py": (["--sockets", "0", "--requests", "20", "--threads", "4"], "p50"),
    "bench_rtt_buckets.py": (["--connections", "20", "--scenarios", "loopback"],
                             "p90 error per scenario"),
    "bench_tracepoints.py": (["--seconds", "1", "--repeats", "1", "--connections", "4",
                              "--client-connects", "200"], "| serve-on |"),
    "bench_slowness.py": (["--baseline", ".", "--connections", "100", "--turns", "1",
                           "--scans", "2"], "this checkout: collect()"),
    "bench_soak.py": (["--minutes", "0.3", "--processes", "1", "--clients", "1",
                       "--pairs", "10"], "Scrapes:"),
    "bench_quiet.py": (["--smoke"], "| median |"),
    "bench_check_nginx.py": (["--pairs", "100", "--leaked", "3", "--rounds", "1"],
                             "| check --window 0 ms (rounds) |"),
    "bench_events.py": (["--smoke"], "whole daemon us/event: median"),
}  # fmt: skip
SECONDS = 240


def test_every_benchmark_has_a_smoke_run() -> None:
    present = {path.name for path in BENCHMARKS.glob("bench_*.py")}
    assert present == set(SMOKE), "a benchmark without a smoke run here, or one gone"


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_runs(name: str, tmp_path: Path) -> None:
    arguments, expected = SMOKE[name]
    argv = [sys.executable, str(BENCHMARKS / name), *arguments]
    if name == "bench_soak.py":  # its report between markers, in a file of its own
        (tmp_path / "soak.md").write_text(
            "<!-- bench_soak results -->\n<!-- /bench_soak results -->\n"
        )
        argv += ["--output", str(tmp_path / "soak.md")]
    result = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=tcpwatch_env(),
        capture_output=True,
        text=True,
        timeout=SECONDS,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert expected in result.stdout, result.stdout[-3000:]
    if name == "bench_soak.py":
        assert expected in (tmp_path / "soak.md").read_text()
