"""A Debian root with a real systemd, booted with systemd-nspawn, for tests of the systemd unit.

This kind of machine has no systemd as PID 1, but one boots in a container (REAL-COMPONENTS.md)::

    base = ensure_base_root()              # debootstrap once, then reused from the cache
    wheels = build_wheelhouse(scratch)     # tcpwatch and its dependencies as wheels, offline
    with BootedContainer(base) as box:     # a private copy of the root, booted
        box.run("systemctl", "start", "tcpwatch")
        box.properties("tcpwatch", "ActiveState", "MainPID")
    # the container is killed and its copy removed, even after a failure

The base root is built once per include list into ``$TCPWATCH_TEST_CACHE`` (default
/var/cache/tcpwatch-tests): debootstrap writes into a temporary directory beside it, which is
renamed into place only when complete, under a lock, so an interrupted or concurrent build never
leaves a half-built root where a later run would use it. Tests boot a copy, never the cache.

The container shares the host's network namespace (no --private-network): a service inside
listens on the host's loopback, and sees the host's sockets. It has its own PID namespace, so
process attribution inside it only sees the container's processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iproute2", "procps")
# Bump when the recipe below changes in a way the include list does not show.
RECIPE = "1"
PYTHON_VERSION = "3.11"  # bookworm's python3: the wheelhouse is built for it
CACHE_DIR = os.environ.get("TCPWATCH_TEST_CACHE", "/var/cache/tcpwatch-tests")
DEBOOTSTRAP_SECONDS = 900.0
BOOT_SECONDS = 90.0
COMMAND_SECONDS = 60.0
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "systemd-analyze", "setpriv")
COMPLETE_MARKER = ".tcpwatch-base-complete"
REPO = Path(__file__).resolve().parents[2]


class ContainerError(Exception):
    """Building, booting or driving the container failed (the message says what and why)."""


def missing_prerequisites() -> list[str]:
    """What this machine lacks for the container tests, as sentences (empty when all is well)."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"systemd container tests need root (running as uid {os.geteuid()})")
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            problems.append(
                f"'{tool}' is not on PATH: install the Debian packages debootstrap, "
                "systemd-container, systemd and util-linux"
            )
    return problems


def require_prerequisites() -> None:
    problems = missing_prerequisites()
    if problems:
        raise ContainerError("; ".join(problems))


# -- the cached base root -------------------------------------------------------------------------


def base_root_path(cache_dir: str = CACHE_DIR, include: Sequence[str] = INCLUDE) -> Path:
    """Where the base root for the current recipe lives: one directory per include list."""
    recipe = f"{SUITE} {VARIANT} {','.join(sorted(include))} {RECIPE}"
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{SUITE}-{digest}"


def ensure_base_root(cache_dir: str = CACHE_DIR, include: Sequence[str] = INCLUDE) -> Path:
    """The debootstrapped base root, built now (about 90 s) if the cache does not hold it yet.

    ``include``: the packages beyond minbase (INCLUDE by default); each list is its own root."""
    require_prerequisites()
    final = base_root_path(cache_dir, include)
    if (final / COMPLETE_MARKER).is_file():
        return final
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run builds; we wait and reuse its result
        if (final / COMPLETE_MARKER).is_file():
            return final
        if final.exists():  # a root without its marker: left by a recipe we no longer trust
            shutil.rmtree(final)
        building = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=cache_dir))
        try:
            building.chmod(0o755)  # it becomes the container's /, which every user must traverse
            _debootstrap(building, include)
            (building / COMPLETE_MARKER).write_text(
                json.dumps({"suite": SUITE, "variant": VARIANT, "include": list(include)}) + "\n"
            )
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return final


def _debootstrap(target: Path, include: Sequence[str] = INCLUDE) -> None:
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(include)}",
        SUITE,
        str(target),
    ]
    mirror = os.environ.get("TCPWATCH_DEBIAN_MIRROR")
    if mirror:
        argv.append(mirror)
    log_path = target.with_name(target.name + ".log")
    try:
        with open(log_path, "w") as log:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=DEBOOTSTRAP_SECONDS,
                check=False,
            )
    except subprocess.TimeoutExpired:
        raise ContainerError(
            f"debootstrap did not finish within {DEBOOTSTRAP_SECONDS:g} s; log: {_tail(log_path)}"
        ) from None
    if result.returncode != 0:
        raise ContainerError(f"{' '.join(argv)} exited {result.returncode}: {_tail(log_path)}")
    log_path.unlink(missing_ok=True)


def _tail(path: Path, characters: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError as error:
        return f"(log unreadable: {error})"


# -- wheels ---------------------------------------------------------------------------------------


def project_dependencies(repo: Path = REPO) -> list[str]:
    """The runtime requirements in pyproject.toml (``psutil>=5.9``, ...)."""
    with open(repo / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return [str(requirement) for requirement in project["dependencies"]]


def build_wheelhouse(
    destination: Path, python_version: str = PYTHON_VERSION, repo: Path = REPO
) -> Path:
    """A directory holding a tcpwatch wheel of the working tree and wheels of its dependencies
    for CPython ``python_version`` on this platform, so installs need no network afterwards.

    The dependencies come from the package registry through pip (its cache makes reruns quick).
    """
    destination.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    with tempfile.TemporaryDirectory(prefix="tw-wheel-src-") as source:
        # setuptools writes build/ and *.egg-info into the tree it builds: build a copy.
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(repo / name, Path(source) / name)
        shutil.copytree(
            repo / "tcpwatch",
            Path(source) / "tcpwatch",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        _host(
            [*pip, "wheel", "--no-deps", "--wheel-dir", str(destination), source],
            timeout=300,
            what="building the tcpwatch wheel",
        )
    _host(
        [
            *pip,
            "download",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--dest",
            str(destination),
            *project_dependencies(repo),
        ],
        timeout=300,
        what=f"downloading dependency wheels for Python {python_version}",
    )
    return destination


def locked_wheelhouse(
    destination: Path, python_version: str = PYTHON_VERSION, repo: Path = REPO
) -> Path:
    """Wheels of requirements/runtime.txt and build.txt (exact versions, hash-checked) for
    CPython ``python_version``, so a build inside a root without network (PIP_NO_INDEX=1,
    PIP_FIND_LINKS=destination) installs the very files the lock names."""
    destination.mkdir(parents=True, exist_ok=True)
    _host(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--quiet",
            "download",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--dest",
            str(destination),
            "--require-hashes",
            "-r",
            str(repo / "requirements" / "runtime.txt"),
            "-r",
            str(repo / "requirements" / "build.txt"),
        ],
        timeout=300,
        what=f"downloading the locked wheels for Python {python_version}",
    )
    return destination


def _host(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ContainerError(f"{what}: {' '.join(argv)} took over {timeout:g} s") from None
    if result.returncode != 0:
        raise ContainerError(
            f"{what}: {' '.join(argv)} exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-3000:]}"
        )
    return result


# -- a booted copy ------------------------------------------------------------------------------


class BootedContainer:
    """A private copy of ``base`` booted with ``systemd-nspawn --boot`` for one ``with`` block.

    On exit (normal or not) the container is powered off (killed if it does not stop within
    ``stop_seconds``) and the copy removed. ``files`` are copied into the root before boot
    (root path -> host path); ``nspawn_options`` are added to nspawn's command line (a
    capability the container's systemd may hand on, a host path bound in); ``console_log``
    collects nspawn's and the container's console.
    """

    def __init__(
        self,
        base: Path,
        files: Mapping[str, Path] | None = None,
        stop_seconds: float = 15.0,
        cache_dir: str = CACHE_DIR,
        private_network: bool = False,
        nspawn_options: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.private_network = private_network
        self.files = dict(files or {})
        self.nspawn_options = tuple(nspawn_options)
        self.stop_seconds = stop_seconds
        self.cache_dir = cache_dir
        self.workdir: Path | None = None
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None
        self._spawned: list[subprocess.Popen[str]] = []

    @property
    def root(self) -> Path:
        if self.workdir is None:
            raise ContainerError("the container is not set up (use `with BootedContainer(...)`)")
        return self.workdir / "root"

    def __enter__(self) -> BootedContainer:
        require_prerequisites()
        runs = Path(self.cache_dir) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="tw-nspawn-", dir=runs))
        try:
            _host(
                ["cp", "-a", "--reflink=auto", str(self.base), str(self.root)],
                timeout=300,
                what="copying the base root",
            )
            (self.root / COMPLETE_MARKER).unlink(missing_ok=True)
            for inside, source in self.files.items():
                target = self.root / inside.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, target)
                else:
                    shutil.copy2(source, target)
            self._boot()
        except BaseException as error:
            try:
                self.close()
            except ContainerError as cleanup_error:
                error.add_note(f"also, cleaning up the container failed: {cleanup_error}")
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except ContainerError as cleanup_error:
            if error is None:
                raise
            error.add_note(f"also, cleaning up the container failed: {cleanup_error}")

    @property
    def console_log(self) -> Path:
        if self.workdir is None:
            raise ContainerError("the container is not set up")
        return self.workdir / "console.log"

    def console_tail(self, characters: int = 4000) -> str:
        return _tail(self.console_log, characters)

    def _boot(self) -> None:
        with open(self.console_log, "wb") as console:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    f"--directory={self.root}",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=passive",
                    f"--machine=tw-{secrets_token()}",
                    *(["--private-network"] if self.private_network else []),
                    *self.nspawn_options,
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid1 = self._find_pid1()
        deadline = time.monotonic() + BOOT_SECONDS
        state = ""
        while time.monotonic() < deadline:
            remaining = max(deadline - time.monotonic(), 1.0)
            result = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
            )
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise ContainerError(
            f"the container did not finish booting within {BOOT_SECONDS:g} s (state {state!r}); "
            f"console: {self.console_tail()}"
        )

    def _find_pid1(self, timeout: float = 30.0) -> int:
        """The container's init: the nspawn process' descendant whose innermost pid is 1."""
        assert self.nspawn is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited {self.nspawn.returncode} while booting; "
                    f"console: {self.console_tail()}"
                )
            for pid in _descendants(self.nspawn.pid):
                nspids = _status_field(pid, "NSpid")
                if nspids is not None and len(nspids.split()) > 1 and nspids.split()[-1] == "1":
                    return pid
            time.sleep(0.1)
        raise ContainerError(
            f"no container init appeared under systemd-nspawn (pid {self.nspawn.pid}) within "
            f"{timeout:g} s; console: {self.console_tail()}"
        )

    def exec_argv(self, *argv: str) -> list[str]:
        """argv that runs ``argv`` inside the container (all its namespaces) as root."""
        if self.pid1 is None:
            raise ContainerError("the container is not booted")
        return ["nsenter", "-t", str(self.pid1), "-a", "--", *argv]

    def environment(self) -> dict[str, str]:
        """A clean environment for commands inside: the host's PATH and Python variables would
        point at host directories."""
        return {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "TERM": "dumb"}

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = COMMAND_SECONDS,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container and wait for it (killed after ``timeout`` s)."""
        full = self.exec_argv(*argv)
        try:
            result = subprocess.run(
                full,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.environment(),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ContainerError(
                f"{' '.join(argv)!r} inside the container took over {timeout:g} s"
            ) from None
        if check and result.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)!r} inside the container exited {result.returncode}: "
                f"{(result.stderr.strip() or result.stdout.strip())[-3000:]}"
            )
        return result

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """Start a long-lived process inside the container; killed by ``close()`` at the latest."""
        process = subprocess.Popen(
            self.exec_argv(*argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.environment(),
            start_new_session=True,
        )
        self._spawned.append(process)
        return process

    def properties(self, unit: str, *names: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit inside the container."""
        output = self.run("systemctl", "show", unit, f"--property={','.join(names)}").stdout
        values = {}
        for line in output.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def journal(self, unit: str, lines: int = 60) -> str:
        """The unit's recent journal, for failure messages (never raises)."""
        try:
            result = self.run(
                "journalctl",
                "--no-pager",
                "-o",
                "short-monotonic",
                "-n",
                str(lines),
                "-u",
                unit,
                check=False,
                timeout=20,
            )
        except ContainerError as error:
            return f"(journal unavailable: {error})"
        return result.stdout + result.stderr

    def close(self) -> None:
        """Stop the container (poweroff, then SIGKILL) and remove the copy. Safe to call twice."""
        problems: list[str] = []
        # First what we started with nsenter: while one lives, the container's shutdown waits.
        for process in self._spawned:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"{process.args!r} survived SIGKILL")
        self._spawned.clear()
        if self.nspawn is not None:
            if self.nspawn.poll() is None:
                # SIGTERM makes nspawn ask the container's init to power off.
                with contextlib.suppress(ProcessLookupError):
                    self.nspawn.send_signal(signal.SIGTERM)
                try:
                    self.nspawn.wait(timeout=self.stop_seconds)
                except subprocess.TimeoutExpired:
                    self._kill_everything()
                    try:
                        self.nspawn.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        problems.append(f"systemd-nspawn (pid {self.nspawn.pid}) survived SIGKILL")
            if self.pid1 is not None and _alive(self.pid1):
                self._kill_everything()
            self.nspawn = None
            self.pid1 = None
        if self.workdir is not None and not problems:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"could not remove {self.workdir}")
            self.workdir = None
        if problems:
            raise ContainerError("; ".join(problems))

    def _kill_everything(self) -> None:
        # Killing the container's init kills its whole PID namespace.
        for pid in (self.pid1, self.nspawn.pid if self.nspawn else None):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.nspawn is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nspawn.pid, signal.SIGKILL)


def secrets_token() -> str:
    return os.urandom(4).hex()


def _descendants(root_pid: int) -> Iterator[int]:
    """Pids below ``root_pid``, breadth first, from /proc/PID/task/*/children."""
    queue = [root_pid]
    seen = {root_pid}
    while queue:
        pid = queue.pop(0)
        for task in _listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                for child in map(int, children):
                    if child not in seen:
                        seen.add(child)
                        queue.append(child)
                        yield child


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _status_field(pid: int, name: str) -> str | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
