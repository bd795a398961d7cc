"""The systemd unit in deploy/systemd/, checked by systemd's own tools without a running systemd.

- ``systemd-analyze security --offline=true`` rates the unit's exposure at 3.0 or lower, and the
  checks it leaves open are exactly the ones deploy/systemd/README.md explains;
- ``systemd-analyze verify`` prints nothing, in a scratch root holding the unit, an executable
  at ExecStart's path and the host's system units (verify wants all of them to exist);
- the unit declares what the daemon relies on (Type=notify, watchdog, the three capabilities,
  perf_event_open, /proc left whole), the env file's flags are flags ``tcpwatch serve``
  accepts, and the README names every option the unit sets.

Booting the unit under a real systemd is test_real_systemd.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpwatch.cli import build_parser

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "systemd"
UNIT = DEPLOY / "tcpwatch.service"
ENV_FILE = DEPLOY / "tcpwatch.env"
NETNS_DROP_IN = DEPLOY / "tcpwatch-netns.conf"
README = DEPLOY / "README.md"
MAX_EXPOSURE = 3.0
# The checks systemd-analyze security leaves open for this unit; README.md says why for each.
EXPECTED_OPEN = frozenset(
    {
        "RootDirectory=/RootImage=",
        "AmbientCapabilities=",
        "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
        "CapabilityBoundingSet=~CAP_SYS_PTRACE",
        "RestrictAddressFamilies=~AF_NETLINK",
        "RestrictAddressFamilies=~AF_UNIX",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "ProcSubset=",
        "PrivateNetwork=",
        "PrivateUsers=",
        "DeviceAllow=",
        "IPAddressDeny=",
        "SystemCallFilter=~@debug",
    }
)
# What the network-namespace drop-in opens on top.
NETNS_EXTRA_OPEN = frozenset({"CapabilityBoundingSet=~CAP_SYS_ADMIN", "RestrictNamespaces=~net"})
_OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


def _systemd_analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not on PATH: install the Debian package 'systemd'")
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        check=False,
    )


def parse_unit(text: str, source: str = "unit") -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file -> (key, value) pairs in order; repeated keys stay repeated.

    >>> parse_unit("[Service]\\nType=notify\\nSystemCallFilter=@system-service\\n")
    {'Service': [('Type', 'notify'), ('SystemCallFilter', '@system-service')]}
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, equals, value = line.partition("=")
        if not equals or current is None:
            raise ValueError(f"{source}: line {number}: not 'Key=value' in a section: {raw!r}")
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def _one(section: list[tuple[str, str]], key: str) -> str:
    values = _values(section, key)
    assert len(values) == 1, f"{key}= set {len(values)} times in {UNIT.name}: {values}"
    return values[0]


def security_report(unit_path: Path) -> tuple[float, frozenset[str]]:
    """(overall exposure, names of the checks left open) for one unit file."""
    text = _systemd_analyze("security", "--offline=true", "--no-pager", str(unit_path))
    match = _OVERALL.search(text.stdout + text.stderr)
    assert match is not None, f"no overall exposure in systemd-analyze output: {text!r}"
    details = _systemd_analyze(
        "security", "--offline=true", "--no-pager", "--json=short", str(unit_path)
    )
    assert details.returncode == 0, details.stderr
    checks = json.loads(details.stdout)
    open_checks = frozenset(
        check["name"] for check in checks if not check["set"] and check.get("exposure")
    )
    return float(match.group(2)), open_checks


@pytest.fixture
def verify_root(tmp_path: Path) -> Iterator[Path]:
    """A scratch root for ``systemd-analyze verify --root``: the host's system units, the unit
    under test, and stand-ins for the binaries the unit runs."""
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        pytest.fail(f"{host_units} is missing: install the Debian package 'systemd'")
    root = tmp_path / "root"
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    for binary in ("usr/local/bin/tcpwatch", "bin/kill"):
        stand_in = root / binary
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/tcpwatch.service")
    yield root


def test_exposure_is_at_most_three_and_every_open_check_is_explained() -> None:
    score, open_checks = security_report(UNIT)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}; open: {sorted(open_checks)}"
    assert open_checks == EXPECTED_OPEN, (
        f"newly open: {sorted(open_checks - EXPECTED_OPEN)}; "
        f"newly closed: {sorted(EXPECTED_OPEN - open_checks)} (update README.md and this test)"
    )
    readme = README.read_text()
    # Markdown tables escape the | inside a check's name.
    unexplained = [
        name for name in sorted(EXPECTED_OPEN) if "`" + name.replace("|", "\\|") + "`" not in readme
    ]
    assert not unexplained, f"README.md does not explain these open checks: {unexplained}"
    assert f"rates it **{score:.1f}" in readme, f"README.md should quote the exposure, {score:.1f}"
    assert f"rates it {score:.1f}." in UNIT.read_text(), f"the unit should quote {score:.1f}"


def test_exposure_parser_sees_an_unhardened_unit(tmp_path: Path) -> None:
    # The same parsing on a bare unit must report it as exposed, or the score above means nothing.
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/usr/local/bin/tcpwatch serve\n")
    score, open_checks = security_report(bare)
    assert score > 9.0
    assert EXPECTED_OPEN - {"DeviceAllow=", "AmbientCapabilities="} <= open_checks


def test_netns_drop_in_keeps_exposure_low_and_opens_only_what_it_needs(tmp_path: Path) -> None:
    # systemd-analyze reads drop-ins from <unit>.d/ beside the unit file.
    shutil.copy(UNIT, tmp_path / "tcpwatch.service")
    (tmp_path / "tcpwatch.service.d").mkdir()
    shutil.copy(NETNS_DROP_IN, tmp_path / "tcpwatch.service.d" / NETNS_DROP_IN.name)
    score, open_checks = security_report(tmp_path / "tcpwatch.service")
    base_score, _ = security_report(UNIT)
    assert base_score < score <= MAX_EXPOSURE, (base_score, score)
    assert f"drop-in **{score:.1f}**" in README.read_text(), f"README.md should quote {score:.1f}"
    assert f"Exposure with this drop-in: {score:.1f}" in NETNS_DROP_IN.read_text()
    assert open_checks == EXPECTED_OPEN | NETNS_EXTRA_OPEN, sorted(open_checks)


def test_verify_is_clean(verify_root: Path) -> None:
    result = _systemd_analyze("verify", f"--root={verify_root}", "tcpwatch.service")
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == "", f"systemd-analyze verify complained:\n{result}"


def test_verify_in_this_setup_reports_a_broken_unit(verify_root: Path) -> None:
    # verify exits 0 even on unknown keys: only its silence means clean. Prove it speaks here.
    unit = verify_root / "etc/systemd/system/tcpwatch.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    result = _systemd_analyze("verify", f"--root={verify_root}", "tcpwatch.service")
    assert "strictly" in result.stdout + result.stderr, result


def test_unit_declares_what_the_daemon_relies_on() -> None:
    unit = parse_unit(UNIT.read_text(), UNIT.name)
    service = unit["Service"]
    assert _one(service, "Type") == "notify"
    assert _one(service, "NotifyAccess") == "main"
    assert _one(service, "WatchdogSec") != "0"
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _one(service, "DynamicUser") == "yes"
    assert _one(service, "EnvironmentFile") == "-/etc/default/tcpwatch"
    exec_start = shlex.split(_one(service, "ExecStart"))
    assert exec_start[:4] == [
        "/usr/local/bin/tcpwatch",
        "serve",
        "--config",
        "/etc/tcpwatch/config.yaml",
    ]
    assert exec_start[-1] == "$TCPWATCH_FLAGS"
    wanted = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_PERFMON"}
    assert set(_one(service, "AmbientCapabilities").split()) == wanted
    assert set(_one(service, "CapabilityBoundingSet").split()) == wanted
    # /proc/net and /proc/sys are data sources; other users' /proc/PID/fd feed attribution.
    assert _one(service, "ProcSubset") == "all"
    assert _values(service, "PrivateUsers") in ([], ["no"])  # caps must reach host processes
    assert "AF_NETLINK" in _one(service, "RestrictAddressFamilies").split()
    assert "perf_event_open" in _values(service, "SystemCallFilter")  # the tracepoints source


def test_env_file_flags_are_serve_flags() -> None:
    assignments = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            assignments[key] = shlex.split(value)[0] if value.strip() else ""
    assert set(assignments) == {"TCPWATCH_FLAGS"}, assignments
    flags = assignments["TCPWATCH_FLAGS"].split()
    assert flags, "the env file should show an example of the flags it carries"
    parsed = build_parser().parse_args(["serve", "--config", "/etc/tcpwatch/config.yaml", *flags])
    assert parsed.command == "serve"


def test_readme_explains_every_option_the_units_set() -> None:
    readme = README.read_text()
    keys: set[str] = set()
    for path in (UNIT, NETNS_DROP_IN):
        for section in parse_unit(path.read_text(), path.name).values():
            keys.update(key for key, _ in section)
    missing = sorted(key for key in keys if f"`{key}=" not in readme)
    assert not missing, f"deploy/systemd/README.md does not explain: {missing}"
