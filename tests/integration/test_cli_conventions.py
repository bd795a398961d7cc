"""Issue 11 against the real kernel: `check`'s Nagios perfdata and --emit-sysctl on a namespace
with a full accept queue, and --path.rootfs making K03 fire from a fixture root's leftover
tcp_tw_recycle line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from . import populations
from .netns import REPO_ROOT, Netns, run_tcpwatch, tcpwatch_env

pytestmark = pytest.mark.integration

PORT = 24801
# label=value[UOM];[warn];[crit];[min];[max] (Nagios plugin guidelines).
PERF_ITEM = re.compile(
    r"^(?P<label>[a-z_]+)=(?P<value>-?[0-9.]+)(?P<uom>%|s|ms|us|B|KB|MB|TB|c)?"
    r"(?:;(?P<warn>[0-9.]*))?(?:;(?P<crit>[0-9.]*))?(?:;(?P<min>[0-9.]*))?(?:;(?P<max>[0-9.]*))?$"
)


def perfdata(first_line: str) -> dict[str, re.Match[str]]:
    status, bar, perf = first_line.partition(" | ")
    assert bar and status.startswith("TCPWATCH "), first_line
    items = {}
    for item in perf.split(" "):
        match = PERF_ITEM.match(item)
        assert match is not None, item
        items[match["label"]] = match
    return items


def test_perfdata_and_emit_sysctl_on_a_full_accept_queue(netns: Netns) -> None:
    populations.accept_queue_full(netns, port=PORT, backlog=4)
    netns.sysctl("net.core.somaxconn", 128)
    result = run_tcpwatch(netns, "check", "--window", "0", "--color", "never")
    assert result.returncode == 2, result.stderr  # Q01 is critical
    items = perfdata(result.stdout.splitlines()[0])
    fill = items["accept_queue_fill"]
    assert float(fill["value"]) == pytest.approx(125.0) and fill["uom"] == "%"  # 5 of 4
    assert (fill["warn"], fill["crit"], fill["min"], fill["max"]) == ("80", "100", "0", "100")
    assert int(items["critical"]["value"]) >= 1
    assert result.stderr == ""  # not a terminal: no progress line

    emitted = run_tcpwatch(netns, "check", "--window", "0", "--emit-sysctl")
    assert emitted.returncode == 2, emitted.stderr
    # Another namespace than the host's: /etc/sysctl.d does not apply, nothing is set here.
    settings = [line for line in emitted.stdout.splitlines() if line and line[0] != "#"]
    assert settings == [], emitted.stdout
    assert "Left out: " in emitted.stdout and "other network namespaces" in emitted.stdout


def test_rootfs_makes_k03_fire_from_a_leftover_line(tmp_path: Path) -> None:
    # Read-only on this host: check reads /proc of the namespace it runs in and the files
    # below --path.rootfs; it changes nothing. K03's leftover case is the host namespace's.
    if os.path.exists("/proc/sys/net/ipv4/tcp_tw_recycle"):
        pytest.fail(
            "this kernel still has tcp_tw_recycle (< 4.12): K03's leftover case needs one without"
        )
    root = tmp_path / "node"
    (root / "etc" / "sysctl.d").mkdir(parents=True)
    (root / "etc" / "sysctl.d" / "10-old.conf").write_text(
        "# tuning from 2015\nnet.ipv4.tcp_tw_recycle = 1\n"
    )

    def k03(rootfs: Path) -> list[dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-m", "tcpwatch", "check", "--window", "0", "--format", "json",
             "--path.rootfs", str(rootfs)],
            capture_output=True, text=True, timeout=120, env=tcpwatch_env(), cwd=str(REPO_ROOT),
            check=False,
        )  # fmt: skip
        assert result.returncode in (0, 1, 2), result.stderr
        return [f for f in json.loads(result.stdout)["findings"] if f["id"] == "K03"]

    (finding,) = k03(root)
    assert finding["netns"] == "host"
    assert "/etc/sysctl.d/10-old.conf:2" in json.dumps(finding["evidence"])
    assert "sed -i -e '2s/^/# tcp_tw_recycle" in str(finding["remediation"])
    assert str(root) not in json.dumps(finding)  # the node's paths, as the node sees them
    empty = tmp_path / "empty"
    empty.mkdir()
    assert k03(empty) == []
