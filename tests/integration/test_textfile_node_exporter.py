"""`tcpwatch metrics --output` read by Debian's real node_exporter (textfile collector).

tcpwatch writes its file inside a throw-away namespace; node_exporter, with its default collectors
plus the textfile collector on that directory, serves on the namespace's loopback and is scraped
there. The scrape must be clean: node_textfile_scrape_error 0, no "was collected before" (a series
node_exporter also exports itself, such as process_*), and tcpwatch's series present. A control
file with prometheus-client's process collector shows that such a clash is caught.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from .netns import Netns, run_tcpwatch

pytestmark = pytest.mark.integration

NODE_EXPORTER = "prometheus-node-exporter"  # Debian's name for node_exporter
PORT = 9100  # the namespace is ours: its loopback has no other listener
CLASH = "was collected before"
SCRAPE_PROGRAM = """
import sys, time, urllib.request
deadline = time.monotonic() + 20
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
            sys.stdout.write(response.read().decode())
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
"""


@dataclass(frozen=True)
class Scrape:
    body: str
    log: str  # node_exporter's stderr: gathering errors are logged, the page still says 200

    def value(self, name: str, **labels: str) -> float | None:
        for family in text_string_to_metric_families(self.body):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return sample.value
        return None


def _scrape_textfile_directory(ns: Netns, directory: str) -> Scrape:
    """Start node_exporter on ``directory`` in ``ns``, scrape it once, stop it."""
    exporter = ns.spawn(
        [
            NODE_EXPORTER,
            f"--collector.textfile.directory={directory}",
            f"--web.listen-address=127.0.0.1:{PORT}",
        ],
        lifetime=60,
    )
    try:
        body = ns.run(
            sys.executable, "-c", SCRAPE_PROGRAM, f"http://127.0.0.1:{PORT}/metrics", timeout=40
        ).stdout
        # The gathering error is logged while the response is written: give it a moment.
        deadline = time.monotonic() + 2
        while CLASH not in ns.stderr_of(exporter) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        ns.stop(exporter)
    return Scrape(body, ns.stderr_of(exporter))


@pytest.fixture(scope="module")
def textfile_directory() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="tcpwatch-textfile-")
    # node_exporter reads it as any user would: the directory must be traversable.
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def clean_scrape(integration_prerequisites: None, textfile_directory: str) -> Iterator[Scrape]:
    assert shutil.which(NODE_EXPORTER), (
        f"{NODE_EXPORTER} is not installed (scripts/test installs it)"
    )
    with Netns() as ns:
        target = os.path.join(textfile_directory, "tcpwatch.prom")
        result = run_tcpwatch(ns, "metrics", "--output", target)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "", "with --output, nothing goes to stdout"
        yield _scrape_textfile_directory(ns, textfile_directory)


def test_textfile_is_written_whole_and_alone(textfile_directory: str, clean_scrape: Scrape) -> None:
    path = Path(textfile_directory) / "tcpwatch.prom"
    assert sorted(os.listdir(textfile_directory)) == ["tcpwatch.prom"], "no temporary file left"
    assert path.stat().st_mode & 0o777 == 0o644
    text = path.read_text(encoding="utf-8")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "tcpwatch_build_info" in names
    assert not [name for name in names if not name.startswith("tcpwatch_")], names


def test_node_exporter_reads_it_without_an_error(
    textfile_directory: str, clean_scrape: Scrape
) -> None:
    assert clean_scrape.value("node_textfile_scrape_error") == 0, clean_scrape.log[-2000:]
    assert CLASH not in clean_scrape.log, clean_scrape.log[-2000:]
    assert "error gathering metrics" not in clean_scrape.log, clean_scrape.log[-2000:]
    # node_exporter 1.5 labels the file with its whole path (later releases: the base name).
    path = os.path.join(textfile_directory, "tcpwatch.prom")
    mtime = clean_scrape.value("node_textfile_mtime_seconds", file=path)
    if mtime is None:
        mtime = clean_scrape.value("node_textfile_mtime_seconds", file="tcpwatch.prom")
    assert mtime is not None and abs(mtime - time.time()) < 300


def test_tcpwatch_series_come_through_node_exporter(clean_scrape: Scrape) -> None:
    assert clean_scrape.value("tcpwatch_build_info") == 1
    # The namespace had no socket at all when tcpwatch polled it (node_exporter started later).
    assert clean_scrape.value("tcpwatch_sockets", family="ipv4", state="listen") == 0
    up = [
        sample
        for family in text_string_to_metric_families(clean_scrape.body)
        for sample in family.samples
        if sample.name == "tcpwatch_source_up"
    ]
    assert up and all(sample.value == 1 for sample in up), up


def test_stdout_leaves_out_process_and_platform_metrics(netns: Netns) -> None:
    result = run_tcpwatch(netns, "metrics")
    assert result.returncode == 0, result.stderr
    names = {family.name for family in text_string_to_metric_families(result.stdout)}
    assert "tcpwatch_build_info" in names
    assert not [name for name in names if not name.startswith("tcpwatch_")], names


def test_control_a_process_collector_in_the_textfile_is_caught(
    integration_prerequisites: None,
) -> None:
    """What the checks above would see if tcpwatch still exported process_* (issue 11)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    directory = tempfile.mkdtemp(prefix="tcpwatch-textfile-control-")
    try:
        os.chmod(directory, 0o755)
        Path(directory, "clash.prom").write_bytes(generate_latest(registry))
        with Netns() as ns:
            scrape = _scrape_textfile_directory(ns, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert CLASH in scrape.log and "process_cpu_seconds_total" in scrape.log, scrape.log[-2000:]


TEXTFILE_UNITS = ("tcpwatch-textfile.service", "tcpwatch-textfile.timer")


def test_textfile_units_verify_clean_and_run_what_tcpwatch_accepts(tmp_path: Path) -> None:
    from tcpwatch.cli import build_parser

    from .test_systemd_unit import DEPLOY, README, _systemd_analyze, parse_unit, security_report

    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    stand_in = root / "usr/local/bin/tcpwatch"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in TEXTFILE_UNITS:
        shutil.copy(DEPLOY / name, root / "etc/systemd/system" / name)
    result = _systemd_analyze("verify", f"--root={root}", *TEXTFILE_UNITS)
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), result

    score, _ = security_report(DEPLOY / "tcpwatch-textfile.service")
    assert score <= 3.0
    assert (
        f"rates it **{score:.1f}**"
        in README.read_text(encoding="utf-8").split("## Hosts that already run node_exporter")[1]
    )

    service = parse_unit((DEPLOY / "tcpwatch-textfile.service").read_text())["Service"]
    [exec_start] = [value for key, value in service if key == "ExecStart"]
    binary, *argv = exec_start.split()
    assert binary == "/usr/local/bin/tcpwatch"
    args = build_parser().parse_args(argv)
    assert args.command == "metrics"
    # Debian's node_exporter reads this directory; the sandbox leaves exactly it writable.
    assert os.path.dirname(args.output) == "/var/lib/prometheus/node-exporter"
    assert ("ReadWritePaths", "/var/lib/prometheus/node-exporter") in service
    assert ("Type", "oneshot") in service
    timer = parse_unit((DEPLOY / "tcpwatch-textfile.timer").read_text())
    assert ("WantedBy", "timers.target") in timer["Install"]
