"""The unit's privilege set suffices, and less of it degrades attribution visibly.

tcpwatch runs as ``nobody`` (uid 65534) through ``setpriv``, holding exactly the capabilities of
deploy/systemd/tcpwatch.service (read from the unit) as ambient, inheritable and bounding sets
with no_new_privs, as systemd would start it; then with none, and with each one alone. Inside a
throw-away namespace two other users own the sockets to attribute::

    uid 10001  tw-priv-listen  a listener on LISTEN_PORT
    uid 10002  tw-priv-leak    a listener on LEAK_PORT and CLOSE_WAITS sockets in CLOSE_WAIT

Counts and queues come from sock_diag, which needs no privilege; naming the processes needs
both capabilities: CAP_DAC_READ_SEARCH to list another user's /proc/PID/fd (mode 0500) and
CAP_SYS_PTRACE for the ptrace access check on each fd link. Without them tcpwatch still reports
every socket, reports ``tcpwatch_source_up{source="processes"} 1`` (the source ran), drops the
process names, and says so with ``tcpwatch_process_scan_complete 0`` and a non-zero
``tcpwatch_process_scan_denied_processes``.

The interpreter is Debian's /usr/bin/python3 with tcpwatch and its dependencies installed into
a directory every user can read: the test runner's own Python may live under /root.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcpwatch.sources.perf import online_cpus
from tcpwatch.sources.registry import ENTERING, source_names
from tcpwatch.sources.tracepoints import ring_pages
from tests.integration.netns import Netns, parse_ss
from tests.integration.systemd_container import build_wheelhouse

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "tcpwatch.service"
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
LISTEN_UID = 10001
LEAK_UID = 10002
LISTEN_PORT = 20501
LEAK_PORT = 20502
SERVE_PORT = 20509
CLOSE_WAITS = 3
LISTEN_NAME = "tw-priv-listen"
LEAK_NAME = "tw-priv-leak"
CAP_BITS = {"sys_ptrace": 19, "dac_read_search": 2, "sys_admin": 21, "perfmon": 38}

# Stdlib only: runs as another user under Debian's python3. Names itself, listens, and leaves
# `close_waits` accepted connections whose client end it closed (so they sit in CLOSE_WAIT).
HOLDER = r"""
import ctypes, json, os, socket, sys, time
name, port, close_waits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if ctypes.CDLL(None, use_errno=True).prctl(15, name.encode(), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(16)
held = []
for _ in range(close_waits):
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    server, _ = listener.accept()
    client.close()
    held.append(server)
print(json.dumps({"pid": os.getpid(), "uid": os.getuid()}), flush=True)
time.sleep(240)
"""

GET = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        sys.stdout.write(response.read().decode())
except OSError as error:
    sys.exit(f"GET {sys.argv[1]}: {error}")
"""


def unit_capabilities() -> tuple[str, ...]:
    """The capabilities tcpwatch.service grants (AmbientCapabilities=), setpriv-spelled."""
    for line in UNIT.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AmbientCapabilities":
            return tuple(sorted(cap.lower().removeprefix("cap_") for cap in value.split()))
    raise AssertionError(f"{UNIT} sets no AmbientCapabilities=")


def as_nobody(capabilities: Sequence[str]) -> list[str]:
    """setpriv argv: uid/gid nobody, no groups, no_new_privs, exactly ``capabilities``."""
    caps = ",".join(["-all", *(f"+{cap}" for cap in capabilities)])
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--no-new-privs",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set={caps}",
        "--",
    ]


def as_user(uid: int) -> list[str]:
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


@dataclass(frozen=True, slots=True)
class Runtime:
    """tcpwatch installed for the system Python into a directory every user can read."""

    site: str
    config: str  # S01 warns from CLOSE_WAITS sockets, so `check` names the leaking process

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": self.site, "LANG": "C.UTF-8"}

    def tcpwatch(self, *args: str) -> list[str]:
        return [SYSTEM_PYTHON, "-m", "tcpwatch", *args]


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    for tool in ("setpriv", SYSTEM_PYTHON):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian packages util-linux and python3")
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="tw-priv-"))
    try:
        wheels = build_wheelhouse(scratch / "wheels", python_version=version)
        site = scratch / "site"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--disable-pip-version-check",
                "--quiet",
                "install",
                "--no-index",
                "--find-links",
                str(wheels),
                "--only-binary=:all:",
                "--python-version",
                version,
                "--implementation",
                "cp",
                "--target",
                str(site),
                "tcpwatch",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"installing tcpwatch for {SYSTEM_PYTHON}: {result.stderr}"
        config = scratch / "config.yaml"
        config.write_text(f"rules:\n  S01:\n    warning: {CLOSE_WAITS}\n")
        _readable_by_all(scratch)
        yield Runtime(site=str(site), config=str(config))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _readable_by_all(top: Path) -> None:
    for directory, _, files in os.walk(top):
        os.chmod(directory, os.stat(directory).st_mode | 0o755)
        for name in files:
            path = os.path.join(directory, name)
            mode = os.stat(path).st_mode
            os.chmod(path, mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0))


@dataclass(frozen=True, slots=True)
class Owners:
    listen_pid: int
    leak_pid: int


@pytest.fixture
def population(netns: Netns) -> Owners:
    """The two holders, checked with ss: names, users and socket states as the kernel sees them."""
    listen = netns.spawn(
        [*as_user(LISTEN_UID), SYSTEM_PYTHON, "-c", HOLDER, LISTEN_NAME, str(LISTEN_PORT), "0"]
    )
    leak = netns.spawn(
        [
            *as_user(LEAK_UID),
            SYSTEM_PYTHON,
            "-c",
            HOLDER,
            LEAK_NAME,
            str(LEAK_PORT),
            str(CLOSE_WAITS),
        ]
    )
    listen_info = json.loads(netns.read_line(listen))
    leak_info = json.loads(netns.read_line(leak))
    assert (listen_info["uid"], leak_info["uid"]) == (LISTEN_UID, LEAK_UID)
    deadline = time.monotonic() + 10
    while True:
        sockets = parse_ss(netns.ss("-tanH"))
        close_wait = [s for s in sockets if s.state == "close_wait" and s.local_port == LEAK_PORT]
        if len(close_wait) == CLOSE_WAITS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(close_wait) == CLOSE_WAITS, sockets
    sockets = parse_ss(netns.ss("-tanpH"))  # -p reads every process' fds: once
    owners = {
        s.local_port: {(p.name, p.pid) for p in s.processes} for s in sockets if s.state == "listen"
    }
    assert owners == {
        LISTEN_PORT: {(LISTEN_NAME, listen_info["pid"])},
        LEAK_PORT: {(LEAK_NAME, leak_info["pid"])},
    }, owners
    return Owners(listen_pid=listen_info["pid"], leak_pid=leak_info["pid"])


def effective_capabilities(
    netns: Netns, runtime: Runtime, capabilities: Sequence[str]
) -> dict[str, int]:
    status = netns.run(*as_nobody(capabilities), "cat", "/proc/self/status", env=runtime.env())
    fields = {}
    for line in status.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap") or key in ("Uid", "NoNewPrivs"):
            fields[key] = int(value.split()[0], 16 if key.startswith("Cap") else 10)
    return fields


@dataclass(frozen=True, slots=True)
class Exposition:
    """The parts of one /metrics text this test reads."""

    netns: str
    listener_owners: dict[int, tuple[str, int]]  # port -> (process, pid)
    listener_ports: set[int]
    process_sockets: dict[tuple[str, str], float]  # (process, state) -> sockets
    sockets: dict[str, float]  # state -> sockets, both families
    source_up: dict[str, float]
    scan_complete: float
    denied: float
    # name -> (user, open fds, soft limit) of the owners the `owners` source described (psutil)
    described: dict[str, tuple[str, float, float]] = field(default_factory=dict)


def parse_exposition(text: str) -> Exposition:
    owners: dict[int, tuple[str, int]] = {}
    ports: set[int] = set()
    per_process: dict[tuple[str, str], float] = {}
    sockets: dict[str, float] = {}
    up: dict[str, float] = {}
    complete = denied = -1.0
    netns = ""
    users: dict[str, str] = {}
    open_fds: dict[str, float] = {}
    max_fds: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "tcpwatch_listener_info":
                owners[int(labels["port"])] = (labels["process"], int(labels["pid"]))
            elif sample.name == "tcpwatch_listen_queue_max":
                ports.add(int(labels["port"]))
            elif sample.name == "tcpwatch_process_sockets":
                per_process[(labels["process"], labels["state"])] = sample.value
            elif sample.name == "tcpwatch_sockets":
                sockets[labels["state"]] = sockets.get(labels["state"], 0) + sample.value
            elif sample.name == "tcpwatch_source_up":
                up[labels["source"]] = sample.value
                netns = labels["netns"]
            elif sample.name == "tcpwatch_process_scan_complete":
                complete = sample.value
            elif sample.name == "tcpwatch_process_scan_denied_processes":
                denied = sample.value
            elif sample.name == "tcpwatch_process_start_time_seconds":
                users[labels["process"]] = labels["user"]
            elif sample.name == "tcpwatch_process_open_fds":
                open_fds[labels["process"]] = sample.value
            elif sample.name == "tcpwatch_process_max_fds":
                max_fds[labels["process"]] = sample.value
    described = {name: (users[name], open_fds[name], max_fds[name]) for name in max_fds}
    return Exposition(netns, owners, ports, per_process, sockets, up, complete, denied, described)


def metrics_once(
    netns: Netns, runtime: Runtime, capabilities: Sequence[str], hidepid: bool = False
) -> Exposition:
    argv = [*as_nobody(capabilities), *runtime.tcpwatch("metrics")]
    if hidepid:
        argv = with_hidepid_proc(argv)
    result = netns.run(*argv, env=runtime.env(), check=False)
    assert result.returncode == 0, f"tcpwatch metrics exited {result.returncode}: {result.stderr}"
    return parse_exposition(result.stdout)


def check_once(
    netns: Netns, runtime: Runtime, capabilities: Sequence[str], hidepid: bool = False
) -> tuple[int, dict[str, Any]]:
    """`check --format json`: its exit code and its S01 finding about the leaking holder."""
    argv = [
        *as_nobody(capabilities),
        *runtime.tcpwatch("check", "--config", runtime.config, "--format", "json", "--window", "0"),
    ]
    if hidepid:
        argv = with_hidepid_proc(argv)
    result = netns.run(*argv, env=runtime.env(), check=False)
    assert result.returncode in (0, 1, 2), f"check exited {result.returncode}: {result.stderr}"
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.returncode
    sources = {(s["name"], s["ok"]) for s in report["sources"] if s["netns"] == netns.name}
    assert ("processes", True) in sources and ("sockdiag", True) in sources, report["sources"]
    leaks = [f for f in report["findings"] if f["id"] == "S01" and f["netns"] == netns.name]
    assert len(leaks) == 1, report["findings"]
    assert leaks[0]["evidence"]["close_wait_sockets"] == CLOSE_WAITS
    return result.returncode, leaks[0]


def with_hidepid_proc(argv: Sequence[str]) -> list[str]:
    """``argv`` in a private mount namespace whose /proc hides other users' processes, as
    ProtectProc=invisible sets it up (procfs ``hidepid=invisible``)."""
    script = 'mount -t proc -o hidepid=invisible proc /proc && exec "$@"'
    return ["unshare", "--mount", "--propagation=private", "sh", "-c", script, "sh", *argv]


def assert_counts_and_queues(seen: Exposition) -> None:
    """What sock_diag gives without any privilege: every socket and both listeners' queues."""
    up = dict(seen.source_up)
    # serve also runs the long-lived lifecycle source: subscribing needs no privilege either.
    assert up.pop("lifecycle", 1) == 1, seen.source_up
    # and the tracepoints, which need CAP_PERFMON: the serve tests check it either way.
    up.pop("tracepoints", None)
    long_lived = (ENTERING, "lifecycle", "tracepoints")
    every_poll = [name for name in source_names() if name not in long_lived]
    assert up == dict.fromkeys(every_poll, 1), seen.source_up
    assert seen.sockets["close_wait"] == CLOSE_WAITS
    assert {LISTEN_PORT, LEAK_PORT} <= seen.listener_ports


def assert_fully_attributed(seen: Exposition, owners: Owners) -> None:
    assert_counts_and_queues(seen)
    assert seen.listener_owners[LISTEN_PORT] == (LISTEN_NAME, owners.listen_pid)
    assert seen.listener_owners[LEAK_PORT] == (LEAK_NAME, owners.leak_pid)
    assert seen.process_sockets[(LEAK_NAME, "close_wait")] == CLOSE_WAITS
    assert seen.process_sockets[(LEAK_NAME, "listen")] == 1
    assert seen.process_sockets[(LISTEN_NAME, "listen")] == 1
    assert seen.scan_complete == 1
    # Described with psutil, though prlimit(2) on another user's process needs CAP_SYS_RESOURCE,
    # which the unit does not grant: the soft limit comes from /proc/PID/limits then.
    owned = ((owners.listen_pid, LISTEN_NAME, LISTEN_UID), (owners.leak_pid, LEAK_NAME, LEAK_UID))
    for pid, name, uid in owned:
        with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        user, open_fds, soft = seen.described[name]  # one process of each name: its own
        assert user == str(uid)  # no passwd entry: the uid, as psutil gives it
        assert soft == float(line.split()[3]), line
        assert open_fds == len(os.listdir(f"/proc/{pid}/fd"))


def assert_degraded_visibly(seen: Exposition) -> None:
    assert_counts_and_queues(seen)
    assert LISTEN_PORT not in seen.listener_owners
    assert LEAK_PORT not in seen.listener_owners
    assert not [key for key in seen.process_sockets if key[0] in (LISTEN_NAME, LEAK_NAME)]
    assert seen.scan_complete == 0
    assert seen.denied >= 2  # at least the two holders
    # The holders' owners are unknown, so not described (serve's own listener may be).
    assert not {user for user, _, _ in seen.described.values()} & {str(LISTEN_UID), str(LEAK_UID)}


def test_setpriv_grants_exactly_the_units_capabilities(netns: Netns, runtime: Runtime) -> None:
    capabilities = unit_capabilities()
    assert capabilities == ("dac_read_search", "perfmon", "sys_ptrace")
    mask = sum(1 << CAP_BITS[cap] for cap in capabilities)
    status = effective_capabilities(netns, runtime, capabilities)
    assert status == {
        "Uid": NOBODY,
        "CapInh": mask,
        "CapPrm": mask,
        "CapEff": mask,
        "CapBnd": mask,
        "CapAmb": mask,
        "NoNewPrivs": 1,
    }, status
    bare = effective_capabilities(netns, runtime, ())
    assert (bare["CapEff"], bare["CapBnd"], bare["CapAmb"]) == (0, 0, 0)


def test_unit_capabilities_attribute_other_users_sockets(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    seen = metrics_once(netns, runtime, unit_capabilities())
    assert seen.netns == netns.name
    assert_fully_attributed(seen, population)
    code, leak = check_once(netns, runtime, unit_capabilities())
    assert code == 1  # S01 is a warning
    assert (leak["evidence"]["process"], leak["evidence"]["pid"]) == (
        LEAK_NAME,
        population.leak_pid,
    )


@pytest.mark.parametrize(
    "capabilities",
    [(), ("sys_ptrace",), ("dac_read_search",)],
    ids=["none", "sys_ptrace-only", "dac_read_search-only"],
)
def test_without_both_capabilities_names_are_missing_and_flagged(
    netns: Netns, runtime: Runtime, population: Owners, capabilities: tuple[str, ...]
) -> None:
    seen = metrics_once(netns, runtime, capabilities)
    assert_degraded_visibly(seen)
    _, leak = check_once(netns, runtime, capabilities)
    assert leak["evidence"]["process"] == "unknown"
    assert leak["evidence"]["attribution"] == "incomplete: not every process was scanned"
    assert "pid" not in leak["evidence"]


def test_the_text_report_says_which_privilege_names_the_owners(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    """Issue 22 item 9: an unprivileged check says which privilege would name the owners it
    could not; with the unit's capabilities there is nothing to say. Both say what was checked:
    the listeners and sockets ss sees."""
    ss = parse_ss(netns.ss("-tanH"))
    listeners = sum(1 for s in ss if s.state == "listen")
    for capabilities, noted in (((), True), (unit_capabilities(), False)):
        argv = [*as_nobody(capabilities), *runtime.tcpwatch("check", "--window", "0")]
        done = netns.run(*argv, env=runtime.env(), check=False)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[1].startswith("checked  ") and lines[1].endswith(
            f": {listeners} listeners, {len(ss)} TCP sockets"
        ), lines[1]
        notes = [line for line in lines if line.startswith("! owners not all named")]
        if noted:
            assert len(notes) == 1 and notes[0].startswith(
                f"! owners not all named: {listeners} listeners without an owner; "
            ), lines
            assert notes[0].endswith(
                "(run as root, or with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH as "
                "tcpwatch.service grants)"
            ), notes
        else:
            assert notes == [], lines


def test_the_note_counts_no_listener_the_narrowed_lookup_did_not_look_for(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    """With Q05 disabled, check looks only for the owners its rules read: here the CLOSE_WAIT
    sockets' (S01 fires), not the listeners'. An unprivileged check misses those owners and
    says so, but it did not look for the listeners' owners: it must not count them as missed
    (it said "2 listeners without an owner" before the attribution recorded what it looked
    for)."""
    scratch = Path(tempfile.mkdtemp(prefix="tw-priv-noq05-"))
    try:
        scratch.chmod(0o755)
        config = scratch / "config.yaml"
        config.write_text(
            f"rules:\n  S01:\n    warning: {CLOSE_WAITS}\n  Q05:\n    enabled: false\n"
        )
        config.chmod(0o644)
        argv = [
            *as_nobody(()),
            *runtime.tcpwatch("check", "--config", str(config), "--window", "0"),
        ]
        done = netns.run(*argv, env=runtime.env(), check=False)
        assert done.returncode == 1, done.stdout + done.stderr  # S01 is a warning
        lines = done.stdout.splitlines()
        assert any("S01" in line for line in lines), lines
        notes = [line for line in lines if line.startswith("! owners not all named")]
        assert len(notes) == 1, lines
        assert notes[0].startswith("! owners not all named: the descriptors of "), notes
        assert "without an owner" not in notes[0], notes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve_and_scrape(
    netns: Netns, runtime: Runtime, capabilities: Sequence[str]
) -> tuple[Exposition, str]:
    seen, text, _, _ = _serve_scrape_and_ask(netns, runtime, capabilities)
    return seen, text


def _serve_scrape_and_ask(
    netns: Netns, runtime: Runtime, capabilities: Sequence[str]
) -> tuple[Exposition, str, str, dict[str, Any]]:
    """/metrics of a real serve, its stderr so far, and its /api/v1/snapshot (tracefs mounted
    in ``ip netns exec``'s /sys, as root, before setpriv drops to nobody: Netns.exec_argv)."""
    daemon = netns.spawn(
        [
            *as_nobody(capabilities),
            *runtime.tcpwatch(
                "serve",
                "--listen",
                f"127.0.0.1:{SERVE_PORT}",
                "--interval",
                "1",
                "--log-level",
                "debug",
            ),
        ],
        env=runtime.env(),
        lifetime=120,
    )
    base = f"http://127.0.0.1:{SERVE_PORT}"
    deadline = time.monotonic() + 30
    while True:
        assert daemon.poll() is None, f"tcpwatch serve exited: {netns.stderr_of(daemon)}"
        ready = netns.run(SYSTEM_PYTHON, "-c", GET, f"{base}/-/ready", check=False)
        if ready.returncode == 0:
            break
        assert time.monotonic() < deadline, (
            f"{base}/-/ready not 200 within 30 s: {ready.stderr}; "
            f"daemon stderr: {netns.stderr_of(daemon)}"
        )
        time.sleep(0.3)
    scrape = netns.run(SYSTEM_PYTHON, "-c", GET, f"{base}/metrics", check=False)
    assert scrape.returncode == 0, f"{scrape.stderr}; daemon stderr: {netns.stderr_of(daemon)}"
    api = netns.run(SYSTEM_PYTHON, "-c", GET, f"{base}/api/v1/snapshot", check=False)
    assert api.returncode == 0, f"{api.stderr}; daemon stderr: {netns.stderr_of(daemon)}"
    netns.stop(daemon)
    stderr = netns.stderr_of(daemon)
    return parse_exposition(scrape.stdout), scrape.stdout, stderr, json.loads(api.stdout)


def test_serve_with_unit_capabilities_attributes_other_users_sockets(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    seen, text = _serve_and_scrape(netns, runtime, unit_capabilities())
    assert_fully_attributed(seen, population)
    assert seen.source_up["tracepoints"] == 1  # CAP_PERFMON, and tracefs through the DAC cap
    # The default rings (8 MiB over the CPUs) fit what a user without CAP_IPC_LOCK may lock.
    per_cpu = ring_pages(0, len(online_cpus())) * mmap.PAGESIZE
    match = re.search(r"^tcpwatch_tracepoint_buffer_bytes (\S+)$", text, re.M)
    assert match is not None and float(match.group(1)) == per_cpu, text[-2000:]


def test_serve_without_capabilities_degrades_visibly(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    seen, text = _serve_and_scrape(netns, runtime, ())
    assert_degraded_visibly(seen)
    # The tracepoints are down, with their one reason in the log; nothing else is (above).
    assert seen.source_up["tracepoints"] == 0, text
    # Its own listener is the one it may still name: same uid, no capability needed.
    own = seen.listener_owners.get(SERVE_PORT)
    assert own is not None and own[0] in ("python3", "tcpwatch"), text
    assert re.search(r'^tcpwatch_source_up\{netns="[^"]+",source="processes"\} 1', text, re.M)


def test_serve_without_perfmon_reports_the_tracepoints_down_and_nothing_else(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    """The unit's capabilities but CAP_PERFMON: one source down, with one clear reason in the
    log and in the API; every other source, name and count as with all three."""
    capabilities = tuple(cap for cap in unit_capabilities() if cap != "perfmon")
    seen, text, stderr, api = _serve_scrape_and_ask(netns, runtime, capabilities)
    assert_fully_attributed(seen, population)
    assert seen.source_up["tracepoints"] == 0, text
    assert {name for name, up in seen.source_up.items() if not up} == {"tracepoints"}
    # One line, at the first failure (the debug lines with tracebacks are --log-level debug's).
    failures = [
        line
        for line in stderr.splitlines()
        if "level=warn" in line and "source tracepoints" in line
    ]
    assert len(failures) == 1, stderr
    assert "needs CAP_PERFMON" in failures[0], failures
    (reported,) = [
        source
        for namespace in api["namespaces"]
        for source in namespace["sources"]
        if source["name"] == "tracepoints"
    ]
    assert not reported["ok"] and "CAP_PERFMON" in reported["error"], reported


def test_hidden_proc_still_shows_everything_with_the_units_capabilities(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    # ProtectProc=invisible: CAP_SYS_PTRACE passes the ptrace check that hides a process.
    seen = metrics_once(netns, runtime, unit_capabilities(), hidepid=True)
    assert_fully_attributed(seen, population)
    _, leak = check_once(netns, runtime, unit_capabilities(), hidepid=True)
    assert (leak["evidence"]["process"], leak["evidence"]["pid"]) == (
        LEAK_NAME,
        population.leak_pid,
    )


def test_hidden_proc_without_capabilities_reports_the_scan_incomplete(
    netns: Netns, runtime: Runtime, population: Owners
) -> None:
    """When /proc hides other users' processes (hidepid, systemd's ProtectProc=) instead of
    denying their fds, the scan meets no denial, yet it has not seen every process: tcpwatch reads
    the procfs mount options and its own CapEff and says the scan is incomplete.
    """
    seen = metrics_once(netns, runtime, (), hidepid=True)
    assert_counts_and_queues(seen)
    assert LISTEN_PORT not in seen.listener_owners
    assert LEAK_PORT not in seen.listener_owners
    # Hidden processes are not denials (a visible one of ours may still deny its fds, e.g. while
    # it execs): what must hold is that the scan does not call itself complete.
    assert seen.scan_complete == 0
    _, leak = check_once(netns, runtime, (), hidepid=True)
    assert leak["evidence"]["process"] == "unknown"
    assert leak["evidence"]["attribution"] == "incomplete: not every process was scanned"
