"""The Debian package: built from debian/ with `dpkg-buildpackage -us -uc -b`, installed with dpkg
into the booted bookworm container of test_real_systemd.py, where its service must come up.

The package carries tcpwatch's Python dependencies in /usr/lib/tcpwatch (Debian 12's own
prometheus-client and bcrypt are too old), so it must also leave the system's Python alone.
The container shares the host's network: /etc/default/tcpwatch is put in place before the install
(as configuration management would), pointing the service at a free loopback port, and dpkg keeps
it (--force-confold): that is also the conffile's behaviour under test.
"""

from __future__ import annotations

import gzip
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tcpwatch
from tests.integration.systemd_container import (
    BootedContainer,
    ensure_base_root,
    missing_prerequisites,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUILD_SECONDS = 600
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dpkg-deb", "tar")
CONFFILES = {"/etc/tcpwatch/config.yaml", "/etc/default/tcpwatch"}
DEB_IN_BOX = "/root/tcpwatch.deb"


@dataclass(frozen=True)
class Installed:
    box: BootedContainer
    port: int
    deb: Path
    contents: str  # dpkg-deb --contents
    dist_packages_before: str
    install_output: str


def build_deb(scratch: Path) -> Path:
    """The package as README's quick start builds it: `scripts/install --build-only DIR` runs
    dpkg-buildpackage -us -uc -b in a copy of the working tree."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: scripts/test installs debhelper and dpkg-dev"
    output = scratch / "debs"
    result = subprocess.run(
        [str(REPO / "scripts" / "install"), "--build-only", str(output)],
        capture_output=True,
        text=True,
        timeout=BUILD_SECONDS,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    [deb] = output.glob("tcpwatch_*.deb")
    assert result.stdout.strip().endswith(str(deb)), result.stdout
    return deb


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    problems = missing_prerequisites()
    if problems:
        pytest.fail("systemd container tests cannot run: " + "; ".join(problems), pytrace=False)
    base = ensure_base_root()
    with tempfile.TemporaryDirectory(prefix="tw-deb-") as scratch_name:
        scratch = Path(scratch_name)
        deb = build_deb(scratch)
        contents = subprocess.run(
            ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
        ).stdout
        port = free_port()
        env_file = scratch / "tcpwatch.env"
        shipped = (REPO / "deploy/systemd/tcpwatch.env").read_text()
        env_file.write_text(
            re.sub(
                r"^TCPWATCH_FLAGS=.*$",
                f'TCPWATCH_FLAGS="--web.listen-address 127.0.0.1:{port} --interval 2"',
                shipped,
                flags=re.M,
            )
        )
        files = {DEB_IN_BOX: deb, "/etc/default/tcpwatch": env_file}
        with BootedContainer(base, files) as box:
            box.run("chmod", "0644", "/etc/default/tcpwatch")
            before = box.run("ls", "-R", "/usr/lib/python3/dist-packages").stdout
            result = box.run(
                "dpkg", "--force-confold", "--force-confdef", "-i", DEB_IN_BOX, timeout=300
            )
            yield Installed(box, port, deb, contents, before, result.stdout + result.stderr)


def _wait_for_metrics(port: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                body: str = response.read().decode()
                if "tcpwatch_last_poll_timestamp_seconds" in body:
                    return body
                last = body[:500]
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    raise AssertionError(f"no metrics on 127.0.0.1:{port} within {timeout:g} s: {last}")


def test_the_package_holds_what_an_admin_expects(installed: Installed) -> None:
    paths = {line.split()[-1].lstrip(".") for line in installed.contents.splitlines()}
    for expected in (
        "/usr/bin/tcpwatch",
        "/lib/systemd/system/tcpwatch.service",
        "/lib/systemd/system/tcpwatch-textfile.service",
        "/lib/systemd/system/tcpwatch-textfile.timer",
        "/etc/tcpwatch/config.yaml",
        "/etc/default/tcpwatch",
        "/usr/share/man/man1/tcpwatch.1.gz",
        "/usr/share/bash-completion/completions/tcpwatch",
        "/usr/share/zsh/vendor-completions/_tcpwatch",
        "/usr/share/doc/tcpwatch/copyright",
        "/usr/share/doc/tcpwatch/docs/rules/Q01-accept-queue-full.md",
        "/usr/share/doc/tcpwatch/deploy/systemd/README.md.gz",
        "/usr/lib/tcpwatch/site-packages/tcpwatch/cli.py",
        "/usr/lib/tcpwatch/site-packages/prometheus_client/__init__.py",
        "/usr/lib/tcpwatch/site-packages/bcrypt/__init__.py",
    ):
        assert expected in paths, expected
    # Nothing for the system's Python, nothing byte-compiled at build time.
    assert not [p for p in paths if p.startswith(("/usr/lib/python3", "/usr/local"))]
    assert not [p for p in paths if "__pycache__" in p]
    assert f"tcpwatch_{tcpwatch.__version__}_" in installed.deb.name


def test_configuration_files_are_conffiles_and_the_local_one_is_kept(installed: Installed) -> None:
    box = installed.box
    listed = box.run("dpkg-query", "-W", "-f=${Conffiles}", "tcpwatch").stdout
    conffiles = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert conffiles == CONFFILES
    kept = box.run("cat", "/etc/default/tcpwatch").stdout
    assert f"--web.listen-address 127.0.0.1:{installed.port}" in kept


def test_the_service_starts_cleanly_and_serves_metrics(installed: Installed) -> None:
    box = installed.box
    body = _wait_for_metrics(installed.port)
    state = box.properties(
        "tcpwatch.service", "ActiveState", "SubState", "NRestarts", "UnitFileState", "ExecMainPID"
    )
    assert state["ActiveState"] == "active" and state["SubState"] == "running", (
        state,
        box.journal("tcpwatch.service"),
    )
    assert state["NRestarts"] == "0" and state["UnitFileState"] == "enabled"
    journal = box.journal("tcpwatch.service")
    assert "Traceback" not in journal and "level=error" not in journal, journal
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert samples["tcpwatch_build_info"].labels["version"] == tcpwatch.__version__
    # The service runs from the package: its main process is /usr/bin/tcpwatch's interpreter.
    command = box.run("cat", f"/proc/{state['ExecMainPID']}/cmdline").stdout.split("\0")
    assert "/usr/bin/tcpwatch" in command, command


def test_the_system_python_is_left_alone(installed: Installed) -> None:
    box = installed.box
    assert box.run("ls", "-R", "/usr/lib/python3/dist-packages").stdout == (
        installed.dist_packages_before
    )
    # The system's python3 does not see the private copy.
    probe = box.run("python3", "-c", "import prometheus_client", check=False)
    assert probe.returncode != 0
    version = box.run("tcpwatch", "--version").stdout.strip()
    assert version == f"tcpwatch {tcpwatch.__version__}"


def test_the_textfile_timer_is_installed_but_off_and_its_service_writes(
    installed: Installed,
) -> None:
    box = installed.box
    enabled = box.run("systemctl", "is-enabled", "tcpwatch-textfile.timer", check=False)
    assert enabled.stdout.strip() == "disabled"
    # With node_exporter's directory present (its package creates it), the unit writes the file.
    box.run("mkdir", "-p", "/var/lib/prometheus/node-exporter")
    box.run("systemctl", "start", "tcpwatch-textfile.service", timeout=120)
    written = box.run("cat", "/var/lib/prometheus/node-exporter/tcpwatch.prom").stdout
    assert "tcpwatch_build_info" in written and "process_cpu_seconds_total" not in written
    mode = box.run("stat", "-c", "%a", "/var/lib/prometheus/node-exporter/tcpwatch.prom").stdout
    assert mode.strip() == "644"


def test_completion_and_manual_are_where_the_shells_and_man_look(installed: Installed) -> None:
    box = installed.box
    completion = box.run("cat", "/usr/share/bash-completion/completions/tcpwatch").stdout
    assert "complete -F _tcpwatch tcpwatch" in completion
    manual = box.run("zcat", "/usr/share/man/man1/tcpwatch.1.gz").stdout
    assert manual.startswith('.\\" Generated') and "\n.SH EXIT STATUS\n" in manual


def test_rule_pages_are_installed_and_read_offline(installed: Installed) -> None:
    # Issue 11 item 6: `tcpwatch rules ID` prints the page from the package, no network.
    page = installed.box.run("/usr/bin/tcpwatch", "rules", "K03").stdout
    assert page == (REPO / "docs" / "rules" / "K03-tw-recycle-enabled.md").read_text()


def test_purge_stops_the_service_and_removes_everything(installed: Installed) -> None:
    box = installed.box
    box.run("dpkg", "--purge", "tcpwatch", timeout=120)
    state = box.properties("tcpwatch.service", "ActiveState", "LoadState")
    assert state["ActiveState"] == "inactive" and state["LoadState"] == "not-found", state
    gone = ("/usr/lib/tcpwatch", "/etc/tcpwatch", "/usr/bin/tcpwatch", "/etc/default/tcpwatch")
    for path in gone:
        assert box.run("test", "-e", path, check=False).returncode != 0, path


def test_the_package_points_at_nothing_it_does_not_have(
    installed: Installed, tmp_path: Path
) -> None:
    """Issue 22 item 1: no placeholder (OWNER, example hosts) anywhere in the package; no
    Homepage it does not have; the units document themselves with the man page it installs."""
    from tests.unit.test_packaging import EMAIL_HOST, placeholder_host, placeholders

    fields = subprocess.run(
        ["dpkg-deb", "-f", str(installed.deb)], capture_output=True, text=True, check=True
    ).stdout
    assert "Homepage:" not in fields
    (maintainer,) = [line for line in fields.splitlines() if line.startswith("Maintainer:")]
    assert not [host for host in EMAIL_HOST.findall(maintainer) if placeholder_host(host)]
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(installed.deb), str(tree)], check=True, timeout=120)
    problems = []
    for path in tree.rglob("*"):
        if not path.is_file() or path.suffix in (".so", ".png", ".pyc") or ".so." in path.name:
            continue
        # The bundled third-party packages' own metadata and docs are theirs, not ours.
        if "site-packages" in path.parts and not any(p.startswith("tcpwatch") for p in path.parts):
            continue
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode(errors="replace")
        markdown = path.name.removesuffix(".gz").endswith(".md")
        problems += [f"{path.relative_to(tree)}:{where}" for where in placeholders(text, markdown)]
    assert problems == []
    for unit in ("tcpwatch.service", "tcpwatch-textfile.service", "tcpwatch-textfile.timer"):
        text = (tree / "lib/systemd/system" / unit).read_text()
        assert "Documentation=man:tcpwatch(1)" in text, unit
    assert (tree / "usr/share/man/man1/tcpwatch.1.gz").is_file()
    # The project README, not the systemd one of the same name.
    readme = gzip.decompress((tree / "usr/share/doc/tcpwatch/README.md.gz").read_bytes()).decode()
    assert readme.startswith("# tcpwatch\n")
