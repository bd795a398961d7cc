"""The README's first command, `./scripts/install`, leaves tcpwatch answering on :9477 wherever it
installs (issue 16 item 3): on a fresh Debian root booted with systemd as PID 1 (the package's
service), and on the same root run without systemd (a container, WSL, a CI image), where the
script ends by running `tcpwatch serve` in the foreground.

Each root is a private copy of a debootstrapped bookworm (systemd_container.py, cached under
/var/cache/tcpwatch-tests) with the build tools scripts/install needs, holding a copy of this
checkout. Both run with a private network namespace: their :9477 is their own, never the host's,
and the build has no network, so pip installs the locked wheels (requirements/*.txt, downloaded
here beforehand) from a directory, hash-checked as always. The check enters only the root's
network namespace and fetches http://127.0.0.1:9477/metrics there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tcpwatch
from tests.integration.systemd_container import (
    CACHE_DIR,
    CONTAINER_PATH,
    INCLUDE,
    BootedContainer,
    _descendants,
    _status_field,
    ensure_base_root,
    locked_wheelhouse,
    missing_prerequisites,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# What scripts/install would otherwise fetch with apt: present, so the roots need no network.
INSTALL_INCLUDE = (*INCLUDE, "debhelper", "dpkg-dev", "build-essential", "ca-certificates")
CHECKOUT = "/root/tcpwatch"
WHEELS = "/root/wheels"
PORT = 9477  # the default the README promises
INSTALL_SECONDS = 900.0
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS}
FOREGROUND = "running tcpwatch serve --config /etc/tcpwatch/config.yaml"


@dataclass(frozen=True)
class Prepared:
    base: Path
    checkout: Path  # a copy of this working tree, as a user's checkout
    wheels: Path


def copy_checkout(destination: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", "build", "dist", "results",
    )  # fmt: skip
    shutil.copytree(REPO, destination, symlinks=True, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def prepared() -> Iterator[Prepared]:
    problems = missing_prerequisites()
    if problems:
        pytest.fail("install tests cannot run: " + "; ".join(problems), pytrace=False)
    base = ensure_base_root(include=INSTALL_INCLUDE)
    with tempfile.TemporaryDirectory(prefix="tw-install-") as scratch:
        checkout = copy_checkout(Path(scratch) / "tcpwatch")
        wheels = locked_wheelhouse(Path(scratch) / "wheels")
        yield Prepared(base, checkout, wheels)


def metrics_in_netns_of(pid: int, timeout: float) -> str:
    """http://127.0.0.1:9477/metrics as seen from the network namespace of ``pid`` (only that
    namespace is entered: the fetch runs this machine's Python)."""
    fetch = (
        "import sys, urllib.request\n"
        f"body = urllib.request.urlopen('http://127.0.0.1:{PORT}/metrics', timeout=5).read()\n"
        "sys.stdout.write(body.decode())\n"
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", sys.executable, "-c", fetch],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode == 0 and "tcpwatch_build_info" in result.stdout:
            return result.stdout
        last = (result.stderr or result.stdout).strip()[-300:]
        time.sleep(1)
    raise AssertionError(f"nothing answered on :{PORT} within {timeout:g} s: {last}")


def build_version(body: str) -> str:
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "tcpwatch_build_info":
                return sample.labels["version"]
    raise AssertionError("no tcpwatch_build_info in the exposition")


def test_with_systemd_the_first_command_leaves_the_service_answering(prepared: Prepared) -> None:
    files = {CHECKOUT: prepared.checkout, WHEELS: prepared.wheels}
    with BootedContainer(prepared.base, files, private_network=True) as box:
        env = [f"{key}={value}" for key, value in OFFLINE_PIP.items()]
        result = box.run(
            "env", *env, f"{CHECKOUT}/scripts/install", check=False, timeout=INSTALL_SECONDS
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert "tcpwatch serves http://localhost:9477/metrics" in result.stdout, output[-2000:]
        assert box.pid1 is not None
        body = metrics_in_netns_of(box.pid1, timeout=60)
        assert build_version(body) == tcpwatch.__version__
        state = box.properties("tcpwatch.service", "ActiveState", "UnitFileState")
        assert state == {"ActiveState": "active", "UnitFileState": "enabled"}, (
            state,
            box.journal("tcpwatch.service"),
        )


@contextlib.contextmanager
def plain_root(prepared: Prepared) -> Iterator[Path]:
    """A private copy of the base root with the checkout and wheels in it, removed afterwards."""
    runs = Path(CACHE_DIR) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tw-plain-", dir=runs))
    root = workdir / "root"
    try:
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(prepared.base), str(root)], check=True, timeout=300
        )
        shutil.copytree(prepared.checkout, root / CHECKOUT.lstrip("/"), symlinks=True)
        shutil.copytree(prepared.wheels, root / WHEELS.lstrip("/"))
        yield root
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def inner_pid(nspawn_pid: int) -> int | None:
    """A process inside the root (its own PID namespace), whose network namespace is the root's."""
    for pid in _descendants(nspawn_pid):
        nspids = _status_field(pid, "NSpid")
        if nspids is not None and len(nspids.split()) > 1:
            return pid
    return None


def test_without_systemd_the_first_command_serves_in_the_foreground(prepared: Prepared) -> None:
    with plain_root(prepared) as root, tempfile.TemporaryFile("w+") as log:
        argv = [
            "systemd-nspawn", "--quiet", f"--directory={root}", "--register=no", "--keep-unit",
            "--private-network", "--pipe", "--as-pid2",
            *(f"--setenv={key}={value}" for key, value in OFFLINE_PIP.items()),
            f"--setenv=PATH={CONTAINER_PATH}",
            "--", f"{CHECKOUT}/scripts/install",
        ]  # fmt: skip
        install = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + INSTALL_SECONDS
            while time.monotonic() < deadline and install.poll() is None:
                log.seek(0)
                if FOREGROUND in log.read():
                    break
                time.sleep(2)
            log.seek(0)
            output = log.read()
            assert install.poll() is None, f"scripts/install exited: {output[-4000:]}"
            assert FOREGROUND in output, output[-4000:]
            assert "no systemd as PID 1 here" in output
            pid = inner_pid(install.pid)
            assert pid is not None
            body = metrics_in_netns_of(pid, timeout=60)
            assert build_version(body) == tcpwatch.__version__
            # What answers is the package's tcpwatch, run by the script itself.
            commands = [
                Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
                for p in _descendants(install.pid)
                if Path(f"/proc/{p}/cmdline").exists()
            ]
            assert any(b"/usr/bin/tcpwatch" in c and b"serve" in c for c in commands), commands
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(install.pid, signal.SIGTERM)
            try:
                install.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(install.pid, signal.SIGKILL)
                install.wait(timeout=20)


@pytest.mark.parametrize("args", [["--bogus"], ["--no-serve", "extra"], ["--build-only"]])
def test_a_wrong_argument_is_one_line_and_exit_3(args: list[str]) -> None:
    result = subprocess.run(
        [str(REPO / "scripts" / "install"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode in (1, 3), result  # bash's ${2:?} exits 1
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
