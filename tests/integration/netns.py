"""Throw-away network namespaces for integration tests, and parsers for what runs inside them.

Everything a test creates lives inside one namespace it owns, so the host's sockets, sysctls and
firewall are never touched::

    with Netns() as ns:                       # ip netns add tw-<random>; lo up
        ns.sysctl("net.ipv4.tcp_tw_reuse", "0")
        ns.nft("table inet t { chain c { type filter hook input priority 0; } }")
        helper = ns.spawn([sys.executable, "-c", "..."])   # killed on exit at the latest
        line = ns.read_line(helper, timeout=10)
        sockets = parse_ss(ns.ss("-tanHe", "-4"))
        counters = ns.nstat()                  # {"TcpExtListenOverflows": 3, ...}
    # every process in the namespace is killed and the namespace deleted, even after a failure

All commands run through ``ip netns exec`` with a timeout; spawned helpers additionally run under
``timeout -s KILL <lifetime>`` so nothing outlives its cap even if the test process dies.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

DEFAULT_TIMEOUT = 30.0
DEFAULT_LIFETIME = 300.0
REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_TOOLS = ("ip", "ss", "nstat", "nft", "timeout", "sysctl")
FAMILIES = ("ipv4", "ipv6")

# ss state names -> tcpwatch state names (ss prints TCP_CLOSE as UNCONN).
SS_STATES: Mapping[str, str] = {
    "ESTAB": "established",
    "SYN-SENT": "syn_sent",
    "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1",
    "FIN-WAIT-2": "fin_wait2",
    "TIME-WAIT": "time_wait",
    "UNCONN": "close",
    "CLOSE-WAIT": "close_wait",
    "LAST-ACK": "last_ack",
    "LISTEN": "listen",
    "CLOSING": "closing",
}
# `ss -e` prints one of these for sockets that carry INET_DIAG_SHUTDOWN: full sockets only.
_SHUTDOWN_MARKERS = frozenset({"<->", "-->", "<--", "---"})
_USERS = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=(\d+),fd=(\d+)\)')


class NetnsError(Exception):
    """Creating, using or removing a namespace failed."""


class CommandFailed(NetnsError):
    """A command inside the namespace exited non-zero (message carries argv, code and stderr)."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(argv)!r} exited {returncode}: {stderr.strip() or stdout.strip()[:500]}"
        )


def missing_prerequisites() -> list[str]:
    """What this machine lacks for namespace tests, as sentences (empty when all is well)."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"integration tests need root (running as uid {os.geteuid()})")
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            problems.append(f"'{tool}' is not on PATH ({os.environ.get('PATH', '')})")
    return problems


class Netns:
    """A network namespace named ``tw-<random>`` that exists for the lifetime of a ``with`` block.

    On exit (normal or not) it kills the helpers it spawned, then every process left in the
    namespace (``ip netns pids``), then deletes the namespace. A cleanup failure is raised when
    the block succeeded and attached as a note to the block's own exception otherwise.
    """

    def __init__(self, prefix: str = "tw", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.timeout = timeout
        self._created = False
        self._spawned: list[subprocess.Popen[str]] = []
        self._stderr_files: dict[int, IO[str]] = {}
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Netns:
        self._host_command("ip", "netns", "add", self.name)
        self._created = True
        try:
            self._scratch = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
            self._host_command("ip", "-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
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
        except NetnsError as cleanup_error:
            if error is None:
                raise
            error.add_note(f"also, cleaning up netns {self.name} failed: {cleanup_error}")

    def close(self) -> None:
        """Kill everything in the namespace and delete it. Safe to call twice."""
        problems: list[str] = []
        for process in self._spawned:
            self._kill_helper(process)
        self._spawned.clear()
        for stderr_file in self._stderr_files.values():
            stderr_file.close()
        self._stderr_files.clear()
        if self._created:
            deadline = time.monotonic() + 10.0
            pids = self.pids()
            while pids and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
                pids = self.pids()
            if pids:
                problems.append(f"processes {pids} survived SIGKILL for 10 s")
            try:
                self._host_command("ip", "netns", "del", self.name)
                self._created = False
            except NetnsError as error:
                problems.append(str(error))
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        if problems:
            raise NetnsError(f"netns {self.name}: " + "; ".join(problems))

    def pids(self) -> list[int]:
        """Processes currently inside the namespace."""
        result = self._host_command("ip", "netns", "pids", self.name, check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit()]

    # -- commands ----------------------------------------------------------------------------

    def exec_argv(self, *argv: str) -> list[str]:
        """argv that runs ``argv`` inside the namespace (for callers that need their own Popen).

        ``ip netns exec`` gives the command a fresh /sys without the host's tracefs: it is
        mounted there first (:func:`with_tracefs`), so a tcpwatch run here finds it where a
        host has it. The command is exec'd: its pid is the Popen's.
        """
        return ["ip", "netns", "exec", self.name, *with_tracefs(), *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float | None = None,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (killed after ``timeout`` s)."""
        self._require_alive()
        full = self.exec_argv(*argv)
        result = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=True,
            timeout=self.timeout if timeout is None else timeout,
            env=None if env is None else dict(env),
            cwd=cwd,
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailed(full, result.returncode, result.stdout, result.stderr)
        return result

    def sysctl(self, name: str, value: str | int) -> None:
        """Set a per-namespace ``net.*`` sysctl inside the namespace, verified by reading it back.

        A sysctl that is not per-namespace would change the host; the host's value is compared
        before and after and any change is undone and reported.
        """
        if not name.startswith("net."):
            raise NetnsError(f"refusing sysctl {name}: only net.* sysctls are per-namespace")
        host_path = os.path.join("/proc/sys", *name.split("."))
        host_before = _read_text(host_path)
        wanted = " ".join(str(value).split())
        self.run("sysctl", "-q", "-w", f"{name}={value}")
        host_after = _read_text(host_path)
        if host_after != host_before:
            with open(host_path, "w", encoding="ascii") as restore:
                restore.write(host_before or "")
            raise NetnsError(f"sysctl {name} is not per-namespace: it changed the host (undone)")
        got = " ".join(self.read_sysctl(name).split())
        if got != wanted:
            raise NetnsError(f"sysctl {name}: wrote {wanted!r}, namespace reads back {got!r}")

    def read_sysctl(self, name: str) -> str:
        """A sysctl's value as the namespace sees it."""
        path = os.path.join("/proc/sys", *name.split("."))
        return self.run("cat", path).stdout.strip()

    def nft(self, ruleset: str) -> None:
        """Load nftables rules (``nft -f`` syntax) into the namespace's own ruleset."""
        self.run("nft", "-f", "-", input=ruleset)

    def ss(self, *args: str) -> str:
        """``ss`` output inside the namespace."""
        return self.run("ss", *args).stdout

    def nstat(self) -> dict[str, int]:
        """Absolute values of every kernel counter, zeros included (``nstat -asz``).

        ``-s`` and a private history file keep nstat from touching the host's history.
        """
        env = dict(os.environ)
        env["NSTAT_HISTORY"] = os.path.join(self._scratch_dir(), "nstat.history")
        return parse_nstat(self.run("nstat", "-asz", env=env).stdout)

    # -- helpers that live on ----------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        lifetime: float = DEFAULT_LIFETIME,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[str]:
        """Start a long-lived helper inside the namespace, stdout piped, stderr kept aside.

        It runs under ``timeout -s KILL lifetime`` in its own process group and is killed on
        ``close()`` at the latest. Read its output with ``read_line``; ``stderr_of`` gives its
        stderr for failure messages.
        """
        self._require_alive()
        # Kept open past this call (closed in close()), so no `with`.
        stderr_file = tempfile.TemporaryFile(mode="w+", dir=self._scratch_dir())  # noqa: SIM115
        try:
            process = subprocess.Popen(
                self.exec_argv("timeout", "-s", "KILL", f"{lifetime:g}", *argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                text=True,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            stderr_file.close()
            raise
        self._spawned.append(process)
        self._stderr_files[process.pid] = stderr_file
        return process

    def read_line(self, process: subprocess.Popen[str], timeout: float = DEFAULT_TIMEOUT) -> str:
        """The helper's next stdout line; fails with its stderr if it exits or stays silent."""
        stream = process.stdout
        if stream is None:
            raise NetnsError("helper was not started with a stdout pipe")
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise NetnsError(
                    f"helper {process.args!r} printed nothing within {timeout} s; "
                    f"stderr: {self.stderr_of(process)!r}"
                )
        line = stream.readline()
        if not line:
            process.wait(timeout=5)
            raise NetnsError(
                f"helper {process.args!r} exited {process.returncode} before printing a line; "
                f"stderr: {self.stderr_of(process)!r}"
            )
        return line.rstrip("\n")

    def stderr_of(self, process: subprocess.Popen[str]) -> str:
        """What a spawned helper has written to stderr so far (last 4000 characters)."""
        stderr_file = self._stderr_files.get(process.pid)
        if stderr_file is None:
            return ""
        stderr_file.flush()
        stderr_file.seek(0)
        return stderr_file.read()[-4000:]

    def stop(self, process: subprocess.Popen[str]) -> None:
        """Kill one spawned helper (and its lifetime wrapper) now."""
        self._kill_helper(process)

    # -- internals ---------------------------------------------------------------------------

    def _kill_helper(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            # The helper is a child of the group leader (`timeout`), so kill the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        if process.stdout is not None:
            process.stdout.close()

    def _require_alive(self) -> None:
        if not self._created:
            raise NetnsError(f"netns {self.name} does not exist (use `with Netns() as ns:`)")

    def _scratch_dir(self) -> str:
        if self._scratch is None:
            raise NetnsError(f"netns {self.name} is not open")
        return self._scratch.name

    def _host_command(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=self.timeout, check=False
        )
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
        return result


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except OSError:
        return None


# -- parsers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SsProcess:
    name: str
    pid: int
    fd: int


@dataclass(frozen=True, slots=True)
class SsSocket:
    """One line of ``ss -tanH`` (optionally with ``-e`` and ``-p``)."""

    state: str  # tcpwatch's name: established, syn_recv, ...
    recv_q: int
    send_q: int
    local_address: str  # normalised: no brackets, ``*`` -> ``::``, IPv6 compressed
    local_port: int
    peer_address: str
    peer_port: int | None  # None for the ``*`` of listeners
    inode: int | None = None  # with -e
    full_socket: bool | None = None  # with -e: has a shutdown marker (not TIME_WAIT/request)
    timewait: bool | None = None  # with -e: a timewait socket (TIME_WAIT or orphan FIN_WAIT2)
    processes: tuple[SsProcess, ...] = ()  # with -p

    @property
    def family(self) -> str:
        """``ipv6`` for AF_INET6 sockets (v4-mapped and dual-stack ``*`` too), else ``ipv4``."""
        return "ipv6" if ":" in self.local_address else "ipv4"

    @property
    def key(self) -> tuple[str, str, int, str, int | None, int, int]:
        """What identifies the socket and its queues, timers left out: for quiescence checks."""
        return (
            self.state,
            self.local_address,
            self.local_port,
            self.peer_address,
            self.peer_port,
            self.recv_q,
            self.send_q,
        )


def parse_ss(text: str, source: str = "ss") -> list[SsSocket]:
    """Parse ``ss -tanH[e][p]`` output.

    Example input (``ss -tanHe``)::

        LISTEN    0 8   127.0.0.1:5000    0.0.0.0:*    ino:25926 sk:38 cgroup:unreachable:1 <->
        TIME-WAIT 0 0   127.0.0.1:38686 127.0.0.1:5000 timer:(timewait,59sec,0) ino:0 sk:3a
        ESTAB     0 0   [::ffff:127.0.0.1]:5001  [::ffff:127.0.0.1]:41980 ino:25931 sk:3e <->
        LISTEN    0 8           *:5001       *:*     ino:25927 sk:3d v6only:0 <->
    """
    sockets = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        words = line.split()
        if len(words) < 5 or words[0] not in SS_STATES:
            raise ValueError(f"{source}: line {number}: cannot parse {line!r}")
        try:
            local_address, local_port = _split_endpoint(words[3])
            peer_address, peer_port = _split_endpoint(words[4])
            recv_q, send_q = int(words[1]), int(words[2])
        except ValueError as error:
            raise ValueError(f"{source}: line {number}: {error}: {line!r}") from error
        if local_port is None:
            raise ValueError(f"{source}: line {number}: local port missing: {line!r}")
        rest = words[5:]
        inode = next((int(word[4:]) for word in rest if word.startswith("ino:")), None)
        extended = inode is not None
        processes = tuple(
            SsProcess(match.group(1), int(match.group(2)), int(match.group(3)))
            for word in rest
            if word.startswith("users:")
            for match in _USERS.finditer(word)
        )
        sockets.append(
            SsSocket(
                state=SS_STATES[words[0]],
                recv_q=recv_q,
                send_q=send_q,
                local_address=local_address,
                local_port=local_port,
                peer_address=peer_address,
                peer_port=peer_port,
                inode=inode,
                full_socket=any(word in _SHUTDOWN_MARKERS for word in rest) if extended else None,
                timewait=any(word.startswith("timer:(timewait,") for word in rest)
                if extended
                else None,
                processes=processes,
            )
        )
    return sockets


def _split_endpoint(text: str) -> tuple[str, int | None]:
    address, _, port = text.rpartition(":")
    if not address:
        raise ValueError(f"no ':' in endpoint {text!r}")
    address = address.split("%", 1)[0]  # drop an interface scope (%lo)
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if address == "*":
        address = "::"  # ss prints a dual-stack [::] listener as *
    address = str(ipaddress.ip_address(address))
    return address, None if port == "*" else int(port)


def parse_nstat(text: str, source: str = "nstat") -> dict[str, int]:
    """Parse ``nstat -az`` output into counter name -> absolute value.

    Example input::

        #kernel
        IpInReceives                    19                 0.0
        TcpExtListenOverflows           3                  0.0
    """
    counters = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        if len(words) < 2 or not words[1].isdigit():
            raise ValueError(f"{source}: line {number}: cannot parse {line!r}")
        counters[words[0]] = int(words[1])
    return counters


# -- measuring while nothing moves ----------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Observation(Generic[T]):
    """A measurement taken while the namespace's TCP sockets and watched counters stood still.

    ``sockets`` and ``listeners`` were read with ss right before the measurement and read the
    same (timers aside) right after it; the watched counters were equal before and after too.
    """

    result: T
    sockets: Mapping[str, tuple[SsSocket, ...]]  # family -> its lines of `ss -tanHep`
    listeners: Mapping[str, tuple[SsSocket, ...]]  # family -> its lines of `ss -ltnHe`
    counters_before: Mapping[str, int]  # `nstat -asz`
    counters_after: Mapping[str, int]
    attempts: int


def observe(
    ns: Netns,
    measure: Callable[[], T],
    watched_counters: Iterable[str] = (),
    attempts: int = 10,
    budget: float = 90.0,
) -> Observation[T]:
    """Run ``measure`` between two identical ss/nstat readings, retrying while things move.

    Timers (SYN and SYN-ACK retransmits, TIME_WAIT expiry) can change a population between two
    reads; comparing tcpwatch with ss is only fair on a window where nothing changed.
    """
    watched = tuple(watched_counters)
    deadline = time.monotonic() + budget
    differences = ""
    for attempt in range(1, attempts + 1):
        before = _read_state(ns, with_processes=True)
        result = measure()
        after = _read_state(ns, with_processes=False)
        differences = _state_difference(before, after, watched)
        if not differences:
            return Observation(result, before[0], before[1], before[2], after[2], attempt)
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise NetnsError(f"netns {ns.name} never stood still around the measurement: {differences}")


_State = tuple[
    Mapping[str, tuple[SsSocket, ...]], Mapping[str, tuple[SsSocket, ...]], Mapping[str, int]
]


def _read_state(ns: Netns, with_processes: bool) -> _State:
    # One ss call per kind, both families at once: each -p call scans every fd on the host.
    everything = parse_ss(ns.ss("-tanHep" if with_processes else "-tanHe"), "ss -tanHe[p]")
    listening = parse_ss(ns.ss("-ltnHe"), "ss -ltnHe")
    sockets = {family: tuple(s for s in everything if s.family == family) for family in FAMILIES}
    listeners = {family: tuple(s for s in listening if s.family == family) for family in FAMILIES}
    return sockets, listeners, ns.nstat()


def _state_difference(before: _State, after: _State, watched: tuple[str, ...]) -> str:
    problems = []
    for label, old, new in (("sockets", before[0], after[0]), ("listeners", before[1], after[1])):
        for family in FAMILIES:
            old_keys = sorted(sock.key for sock in old[family])
            new_keys = sorted(sock.key for sock in new[family])
            if old_keys != new_keys:
                gone = set(old_keys) - set(new_keys)
                came = set(new_keys) - set(old_keys)
                problems.append(
                    f"{family} {label} changed (gone {sorted(gone)[:5]}, new {sorted(came)[:5]})"
                )
    for name in watched:
        if before[2].get(name) != after[2].get(name):
            problems.append(f"{name} moved {before[2].get(name)} -> {after[2].get(name)}")
    return "; ".join(problems)


# -- tcpwatch inside a namespace ------------------------------------------------------------------

# Prints take_snapshot()'s result for each CollectSettings keyword set given as JSON in argv[1].
_SNAPSHOT_PROGRAM = """
import dataclasses, json, sys
from collections.abc import Mapping
from tcpwatch.config import CollectSettings
from tcpwatch.snapshot import take_snapshot

def plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(plain(item) for item in value)
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value

json.dump([plain(take_snapshot(CollectSettings(**kw))) for kw in json.loads(sys.argv[1])],
          sys.stdout)
"""


# nstat name -> the counter tcpwatch exports for it (issue 2, "Exposition"; without `_total`).
KERNEL_COUNTER_METRICS: Mapping[str, str] = {
    "TcpExtListenOverflows": "tcpwatch_listen_overflows",
    "TcpExtListenDrops": "tcpwatch_listen_drops",
    "TcpExtTCPReqQFullDrop": "tcpwatch_syn_queue_drops",
    "TcpExtTCPReqQFullDoCookies": "tcpwatch_syn_queue_cookies",
    "TcpExtSyncookiesSent": "tcpwatch_syncookies_sent",
    "TcpExtSyncookiesRecv": "tcpwatch_syncookies_received",
    "TcpExtSyncookiesFailed": "tcpwatch_syncookies_failed",
    "TcpExtTCPTimeWaitOverflow": "tcpwatch_timewait_overflows",
}


def with_tracefs() -> list[str]:
    """argv prefix: tracefs mounted, then the command. ``ip netns exec`` gives its command a
    fresh /sys for the namespace, without the host's tracefs; mounted there (root, in that
    private mount namespace only), the tracepoints source finds it where a host has it."""
    script = (
        'mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; exec "$@"'
    )
    return ["sh", "-c", script, "sh"]


def tcpwatch_env() -> dict[str, str]:
    """The environment for running this checkout's tcpwatch (imports from the repository)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
    )
    return env


def run_tcpwatch(ns: Netns, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python -m tcpwatch ARGS`` inside the namespace; the caller checks the exit code."""
    return ns.run(
        sys.executable,
        "-m",
        "tcpwatch",
        *args,
        check=False,
        timeout=timeout,
        env=tcpwatch_env(),
        cwd=str(REPO_ROOT),
    )


def take_snapshots(
    ns: Netns, *settings: Mapping[str, Any], timeout: float = 120.0
) -> list[dict[str, Any]]:
    """One tcpwatch snapshot per settings mapping (CollectSettings keywords), as plain JSON data.

    Dataclasses become dicts, sets sorted lists, mapping keys strings (``owners["12345"]``).
    """
    result = ns.run(
        sys.executable,
        "-c",
        _SNAPSHOT_PROGRAM,
        json.dumps([dict(item) for item in settings]),
        timeout=timeout,
        env=tcpwatch_env(),
        cwd=str(REPO_ROOT),
    )
    snapshots: list[dict[str, Any]] = json.loads(result.stdout)
    return snapshots
