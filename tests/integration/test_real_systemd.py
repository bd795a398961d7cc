"""tcpwatch.service under a real systemd: a Debian bookworm root booted with systemd-nspawn.

The module boots one container (systemd_container.py: the debootstrapped root is cached, each run
boots a fresh copy) and installs tcpwatch the way deploy/systemd/README.md tells an operator to:
a virtualenv linked to /usr/local/bin/tcpwatch (offline, from wheels built here), the unit, the
example configuration and the env file. Only the env file's flags differ: the container shares
the host's network, so tcpwatch listens on a free loopback port and polls every 2 s.

Inside the container two users hold sockets for tcpwatch to attribute: uid 10001 a listener,
uid 10002 a listener and CLOSE_WAITS sockets in CLOSE_WAIT. Then, in order:

1. `systemctl start` returns once READY=1 arrived; the unit is active, its main process runs as a
   dynamic user with exactly the three capabilities (nspawn hands CAP_PERFMON to the container's
   systemd, as a host's has it), and systemd inside agrees with the host tools
   (`systemd-analyze verify` silent, `security` at most 3.0);
2. /metrics answers with the holders' names and pids (their container pids), their queues as
   `ss` shows them, and their CLOSE_WAIT count; `tcpwatch top` reads the unit's daemon on its
   own (its listener's dynamic user is vouched for by the unit's cgroup);
3. `systemctl reload` applies a changed configuration (attribution off: the names go), keeps the
   old one when the file is broken, and applies the restored one (the names come back), all in
   the same process;
4. a poll loop hung on purpose (its procfs pointed at FIFOs, so a read blocks while the HTTP
   threads keep serving) stops the watchdog pings: systemd kills the process and restarts it;
5. with `namespaces: all`, tcpwatch names a listener inside another network namespace only with
   the netns drop-in (CAP_SYS_ADMIN, RestrictNamespaces=net); without it, entering fails and
   says so in tcpwatch_source_up;
6. `systemctl stop` ends it within seconds with exit status 0.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcpwatch.sources.sysctl import SYSCTLS
from tests.integration.systemd_container import (
    BootedContainer,
    ContainerError,
    build_wheelhouse,
    ensure_base_root,
    missing_prerequisites,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "systemd"
UNIT = "tcpwatch.service"
CONFIG = "/etc/tcpwatch/config.yaml"
INTERVAL = 2
CLOSE_WAITS = 3
LISTEN_NAME = "tw-sd-listen"
LEAK_NAME = "tw-sd-leak"
INNER_NAME = "tw-sd-inner"
INNER_NETNS = "tw-sd-inner"
HOLDER_BACKLOG = 16
UNIT_CAPABILITIES = (1 << 19) | (1 << 2) | (1 << 38)  # SYS_PTRACE, DAC_READ_SEARCH, PERFMON
# What a host's systemd has and nspawn's does not by default: CAP_PERFMON to hand on to the
# unit, and the host's tracefs (nspawn mounts a /sys of its own), for the tracepoints source.
TRACEPOINT_OPTIONS = (
    "--capability=CAP_PERFMON",
    "--system-call-filter=perf_event_open",
    "--bind-ro=/sys/kernel/tracing",
)
WATCHDOG_SECONDS = 60  # WatchdogSec= in the unit
HANG_ROOT = "/srv/tw-hang"

# Stdlib only (the container's python3): names itself, listens with HOLDER_BACKLOG, leaves
# `close_waits` accepted connections whose client end it closed, reports its pid, holds.
HOLDER = r"""
import ctypes, json, os, socket, sys, time
name, port, close_waits, backlog = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if ctypes.CDLL(None, use_errno=True).prctl(15, name.encode(), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(backlog)
held = []
for _ in range(close_waits):
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    server, _ = listener.accept()
    client.close()
    held.append(server)
print(json.dumps({"pid": os.getpid(), "uid": os.getuid()}), flush=True)
time.sleep(600)
"""


@dataclass(frozen=True, slots=True)
class Holder:
    name: str
    port: int
    pid: int  # as the container sees it


@dataclass(frozen=True, slots=True)
class Service:
    box: BootedContainer
    port: int
    listen: Holder
    leak: Holder
    config_text: str  # the example configuration as installed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.box.root / CONFIG.lstrip("/")


def free_port() -> int:
    # The container shares the host's network: ask the host's loopback for a free port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def env_file_for(port: int) -> str:
    """The shipped env file with test flags in TCPWATCH_FLAGS (everything else as shipped)."""
    text = (DEPLOY / "tcpwatch.env").read_text()
    flags = f'TCPWATCH_FLAGS="--web.listen-address 127.0.0.1:{port} --interval {INTERVAL}"'
    changed, count = re.subn(r"^TCPWATCH_FLAGS=.*$", flags, text, flags=re.M)
    assert count == 1, "tcpwatch.env should set TCPWATCH_FLAGS on exactly one line"
    return changed


def start_holder(box: BootedContainer, name: str, uid: int, close_waits: int, *wrap: str) -> Holder:
    port = free_port()
    process = box.spawn(
        *wrap,
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all", "--",
        "python3", "-c", HOLDER, name, str(port), str(close_waits), str(HOLDER_BACKLOG),
    )  # fmt: skip
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(20):
            process.kill()
            raise ContainerError(f"holder {name} printed nothing in 20 s")
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=5)
        raise ContainerError(
            f"holder {name} exited: {process.stderr.read() if process.stderr else ''}"
        )
    info = json.loads(line)
    assert info["uid"] == uid
    return Holder(name=name, port=port, pid=int(info["pid"]))


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    problems = missing_prerequisites()
    if problems:
        pytest.fail("systemd container tests cannot run: " + "; ".join(problems), pytrace=False)
    base = ensure_base_root()
    with tempfile.TemporaryDirectory(prefix="tw-real-systemd-") as scratch:
        wheels = build_wheelhouse(Path(scratch) / "wheels")
        port = free_port()
        env_file = Path(scratch) / "tcpwatch.env"
        env_file.write_text(env_file_for(port))
        files = {
            "/opt/wheelhouse": wheels,
            f"/etc/systemd/system/{UNIT}": DEPLOY / UNIT,
            "/etc/default/tcpwatch": env_file,
            CONFIG: REPO / "config.example.yaml",
        }
        with BootedContainer(base, files, nspawn_options=TRACEPOINT_OPTIONS) as box:
            box.run("python3", "-m", "venv", "/opt/tcpwatch", timeout=120)
            box.run(
                "/opt/tcpwatch/bin/pip", "install", "--quiet", "--no-index", "--find-links",
                "/opt/wheelhouse", "tcpwatch", timeout=300,
            )  # fmt: skip
            box.run("ln", "-sf", "/opt/tcpwatch/bin/tcpwatch", "/usr/local/bin/tcpwatch")
            box.run("chmod", "0644", CONFIG, "/etc/default/tcpwatch")
            box.run("systemctl", "daemon-reload")
            # As README's `enable --now`; also keeps the stopped unit loaded, with its exit status.
            box.run("systemctl", "enable", UNIT)
            listen = start_holder(box, LISTEN_NAME, 10001, 0)
            leak = start_holder(box, LEAK_NAME, 10002, CLOSE_WAITS)
            yield Service(box, port, listen, leak, (REPO / "config.example.yaml").read_text())


# -- helpers --------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Scrape:
    text: str
    owners: dict[int, tuple[str, int]]  # listener port -> (process, pid)
    queue_max: dict[int, float]  # listener port -> effective backlog
    process_sockets: dict[tuple[str, str, str], float]  # (netns, process, state) -> sockets
    source_up: dict[tuple[str, str], float]  # (netns, source) -> 0/1
    netns_owners: dict[tuple[str, int], str]  # (netns, port) -> process
    scan_complete: float | None
    last_poll: float


def scrape(service: Service) -> Scrape:
    status, text = http_get(f"{service.url}/metrics", timeout=10)
    assert status == 200, f"/metrics answered {status}: {text[:500]}"
    owners: dict[int, tuple[str, int]] = {}
    netns_owners: dict[tuple[str, int], str] = {}
    queue_max: dict[int, float] = {}
    per_process: dict[tuple[str, str, str], float] = {}
    up: dict[tuple[str, str], float] = {}
    complete: float | None = None
    last_poll = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "tcpwatch_listener_info":
                netns_owners[(labels["netns"], int(labels["port"]))] = labels["process"]
                if labels["netns"] == "host":
                    owners[int(labels["port"])] = (labels["process"], int(labels["pid"]))
            elif sample.name == "tcpwatch_listen_queue_max" and labels["netns"] == "host":
                queue_max[int(labels["port"])] = sample.value
            elif sample.name == "tcpwatch_process_sockets":
                key = (labels["netns"], labels["process"], labels["state"])
                per_process[key] = sample.value
            elif sample.name == "tcpwatch_source_up":
                up[(labels["netns"], labels["source"])] = sample.value
            elif sample.name == "tcpwatch_process_scan_complete" and labels["netns"] == "host":
                complete = sample.value
            elif sample.name == "tcpwatch_last_poll_timestamp_seconds":
                last_poll = sample.value
    return Scrape(text, owners, queue_max, per_process, up, netns_owners, complete, last_poll)


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, service: Service, step: float = 0.5
) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` s with the unit's journal."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, AssertionError):
            pass  # not answering yet, or not the expected answer yet
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what}: not seen within {timeout:g} s; journal:\n{service.box.journal(UNIT)}"
            )
        time.sleep(step)


def unit_state(service: Service) -> dict[str, str]:
    return service.box.properties(
        UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "Result", "StatusText",
        "ExecMainCode", "ExecMainStatus", "WatchdogUSec",
    )  # fmt: skip


def journal_cursor(service: Service) -> str:
    output = service.box.run("journalctl", "-u", UNIT, "-n", "0", "--show-cursor").stdout
    match = re.search(r"-- cursor: (\S+)", output)
    assert match is not None, f"no journal cursor in {output!r}"
    return match.group(1)


def journal_after(service: Service, cursor: str) -> str:
    return service.box.run(
        "journalctl", "--no-pager", "-o", "cat", "-u", UNIT, f"--after-cursor={cursor}"
    ).stdout


def write_config(service: Service, text: str) -> None:
    service.config_path.write_text(text)
    service.config_path.chmod(0o644)


def replaced(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"config.example.yaml should contain {old!r} exactly once"
    return text.replace(old, new)


def ensure_active(service: Service) -> dict[str, str]:
    """Start the unit if an earlier step left it stopped; the state once active."""
    state = unit_state(service)
    if state["ActiveState"] != "active":
        write_config(service, service.config_text)
        result = service.box.run("systemctl", "start", UNIT, check=False, timeout=150)
        assert result.returncode == 0, f"{result.stderr}\n{service.box.journal(UNIT)}"
        state = unit_state(service)
    assert state["ActiveState"] == "active", f"{state}\n{service.box.journal(UNIT)}"
    return state


def main_process_status(service: Service, pid: str) -> dict[str, str]:
    text = service.box.run("cat", f"/proc/{pid}/status").stdout
    return {
        key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())
    }


# -- the steps ------------------------------------------------------------------------------------


def test_start_returns_after_ready_and_the_unit_is_active(service: Service) -> None:
    started = time.monotonic()
    result = service.box.run("systemctl", "start", UNIT, check=False, timeout=150)
    assert result.returncode == 0, f"{result.stderr}\n{service.box.journal(UNIT)}"
    state = unit_state(service)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # Type=notify: `start` returned after READY=1, which comes after the first poll, so /-/ready
    # answers 200 at once, and the status line is the daemon's own (sd_notify STATUS=).
    assert http_get(f"{service.url}/-/ready")[0] == 200
    assert state["StatusText"], f"no STATUS= from the daemon: {state}"
    assert state["WatchdogUSec"] in ("1min", str(WATCHDOG_SECONDS * 1_000_000)), state
    assert time.monotonic() - started < 60
    status = main_process_status(service, state["MainPID"])
    uid = int(status["Uid"].split()[0])
    assert uid >= 61184, f"DynamicUser= should give a uid from 61184 up: {status['Uid']}"
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == UNIT_CAPABILITIES, (field, status[field])
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status


def test_systemd_inside_agrees_with_the_host_tools(service: Service) -> None:
    verify = service.box.run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify
    security = service.box.run("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match is not None, security
    assert float(match.group(1)) <= 3.0, security.stdout


def test_metrics_show_real_numbers_and_other_users_process_names(service: Service) -> None:
    ensure_active(service)
    seen = scrape(service)
    assert seen.owners.get(service.listen.port) == (LISTEN_NAME, service.listen.pid), seen.owners
    assert seen.owners.get(service.leak.port) == (LEAK_NAME, service.leak.pid), seen.owners
    assert seen.process_sockets.get(("host", LEAK_NAME, "close_wait")) == CLOSE_WAITS
    assert seen.scan_complete == 1
    assert seen.source_up[("host", "processes")] == 1 and seen.source_up[("host", "sockdiag")] == 1
    # CAP_PERFMON from the unit, tracefs through CAP_DAC_READ_SEARCH, perf_event_open allowed
    assert seen.source_up[("host", "tracepoints")] == 1, service.box.journal(UNIT)
    assert abs(time.time() - seen.last_poll) < 30
    # The backlog as the kernel reports it to ss (Send-Q of a listener), read on the host.
    ss = subprocess.run(
        ["ss", "-ltnH", f"sport = :{service.leak.port}"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout.split()  # fmt: skip
    assert ss[0] == "LISTEN" and float(ss[2]) == HOLDER_BACKLOG, ss
    assert seen.queue_max[service.leak.port] == HOLDER_BACKLOG


def test_top_reads_the_unit_it_can_verify(service: Service) -> None:
    """`tcpwatch top` (root, in the container) reads the daemon at its listen address on its own:
    the listener belongs to the unit's dynamic user, neither root nor the caller, and the unit's
    cgroup vouches for that user (issue 21 item 8). Its title names the daemon's pid."""
    state = ensure_active(service)
    config = service.box.root / "etc" / "tcpwatch" / "top.yaml"
    config.write_text(f'listen: "127.0.0.1:{service.port}"\n')
    config.chmod(0o644)
    done = service.box.run("tcpwatch", "top", "-b", "--config", "/etc/tcpwatch/top.yaml",
                           check=False, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    uid = main_process_status(service, state["MainPID"])["Uid"].split()[0]
    title = done.stdout.splitlines()[0]
    assert title.endswith(f"from {service.url} (daemon pid {state['MainPID']}, uid {uid})"), title
    assert "source " not in done.stdout


def test_reload_applies_a_changed_config_and_keeps_the_old_one_when_broken(
    service: Service,
) -> None:
    pid = ensure_active(service)["MainPID"]
    assert service.leak.port in scrape(service).owners
    try:
        without_names = replaced(
            service.config_text, "process_attribution: true", "process_attribution: false"
        )
        write_config(service, without_names)
        service.box.run("systemctl", "reload", UNIT)
        wait_for(
            "reload with process_attribution: false drops the process names",
            lambda: (
                service.leak.port not in scrape(service).owners
                and ("host", "processes") not in scrape(service).source_up
            ),
            timeout=20,
            service=service,
        )
        assert unit_state(service)["MainPID"] == pid, "a reload must not restart the process"

        cursor = journal_cursor(service)
        write_config(service, "collect: [this is not closed\n")
        service.box.run("systemctl", "reload", UNIT)
        wait_for(
            "a broken configuration is reported",
            lambda: (
                "reload failed, still running the previous configuration"
                in journal_after(service, cursor)
            ),
            timeout=20,
            service=service,
        )
        state = unit_state(service)
        assert (state["ActiveState"], state["MainPID"]) == ("active", pid), state
        time.sleep(INTERVAL + 1)  # a poll under the kept configuration
        assert service.leak.port not in scrape(service).owners
    finally:
        write_config(service, service.config_text)
        service.box.run("systemctl", "reload", UNIT, check=False)
    wait_for(
        "reload of the restored configuration brings the names back",
        lambda: scrape(service).owners.get(service.leak.port) == (LEAK_NAME, service.leak.pid),
        timeout=20,
        service=service,
    )
    assert unit_state(service)["MainPID"] == pid


def build_hanging_procfs(service: Service) -> None:
    """A procfs stand-in whose sysctl files are FIFOs: the first read of a poll blocks forever.

    net/sockstat is a regular file, which is all the reload's sanity check looks at.
    """
    root = service.box.root / HANG_ROOT.lstrip("/")
    (root / "net").mkdir(parents=True)
    (root / "net" / "sockstat").write_text(
        "sockets: used 0\nTCP: inuse 0 orphan 0 tw 0 alloc 0 mem 0\n"
    )
    for name in SYSCTLS:
        fifo = root / "sys" / Path(*name.split("."))
        fifo.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mkfifo", "-m", "0644", str(fifo)], check=True, timeout=10)
    for directory in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        directory.chmod(0o755)


def test_watchdog_restarts_a_hung_poll_loop(service: Service) -> None:
    before = ensure_active(service)
    build_hanging_procfs(service)
    cursor = journal_cursor(service)
    hung_at = time.monotonic()
    try:
        write_config(
            service, replaced(service.config_text, "procfs: /proc", f"procfs: {HANG_ROOT}")
        )
        service.box.run("systemctl", "reload", UNIT)
        wait_for(
            "the daemon takes the hanging configuration",
            lambda: "configuration reloaded" in journal_after(service, cursor),
            timeout=20,
            service=service,
        )
    finally:
        # The running daemon holds the hanging configuration; the restarted one reads this.
        write_config(service, service.config_text)
    # Only the poll loop is stuck: HTTP still answers, but the data stops moving. (A poll that
    # was running when the reload came still publishes: let it finish first.)
    time.sleep(INTERVAL + 1)
    frozen = scrape(service).last_poll
    time.sleep(2 * INTERVAL + 1)
    assert scrape(service).last_poll == frozen, "the poll loop was supposed to be stuck"
    assert unit_state(service)["MainPID"] == before["MainPID"]

    def restarted() -> bool:
        state = unit_state(service)
        return (
            state["ActiveState"] == "active"
            and state["MainPID"] not in ("0", before["MainPID"])
            and int(state["NRestarts"]) == int(before["NRestarts"]) + 1
        )

    wait_for("a watchdog restart", restarted, timeout=WATCHDOG_SECONDS + 45, service=service)
    assert time.monotonic() - hung_at > 5, "restarted too early to be the watchdog"
    log = journal_after(service, cursor)
    assert "Watchdog timeout" in log, log
    assert "Failed with result 'watchdog'" in log, log
    wait_for(
        "the restarted daemon names the holders again",
        lambda: scrape(service).owners.get(service.leak.port) == (LEAK_NAME, service.leak.pid),
        timeout=20,
        service=service,
    )


def test_entering_network_namespaces_needs_the_netns_drop_in(service: Service) -> None:
    box = service.box
    ensure_active(service)
    drop_in = box.root / f"etc/systemd/system/{UNIT}.d/netns.conf"
    box.run("ip", "netns", "add", INNER_NETNS)
    try:
        box.run("ip", "-n", INNER_NETNS, "link", "set", "lo", "up")
        inner = start_holder(box, INNER_NAME, 10003, 0, "ip", "netns", "exec", INNER_NETNS)
        write_config(service, service.config_text + "\nnamespaces: all\n")

        box.run("systemctl", "restart", UNIT, timeout=150)
        wait_for(
            "without the drop-in, entering the namespace fails visibly",
            lambda: scrape(service).source_up.get((INNER_NETNS, "netns")) == 0,
            timeout=30,
            service=service,
        )
        assert (INNER_NETNS, inner.port) not in scrape(service).netns_owners
        assert "CAP_SYS_ADMIN" in box.journal(UNIT, lines=200)

        drop_in.parent.mkdir(parents=True, exist_ok=True)
        drop_in.write_text((DEPLOY / "tcpwatch-netns.conf").read_text())
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", UNIT, timeout=150)
        wait_for(
            "with the drop-in, the inner listener is seen and named",
            lambda: scrape(service).netns_owners.get((INNER_NETNS, inner.port)) == INNER_NAME,
            timeout=30,
            service=service,
        )
        seen = scrape(service)
        assert seen.source_up[(INNER_NETNS, "netns")] == 1
        assert seen.source_up[(INNER_NETNS, "sockdiag")] == 1
        # The host namespace is still watched, with its names.
        assert seen.owners.get(service.leak.port) == (LEAK_NAME, service.leak.pid)
    finally:
        drop_in.unlink(missing_ok=True)
        write_config(service, service.config_text)
        box.run("systemctl", "daemon-reload", check=False)
        box.run("systemctl", "restart", UNIT, check=False, timeout=150)
        box.run("ip", "netns", "del", INNER_NETNS, check=False)


def test_stop_is_clean(service: Service) -> None:
    ensure_active(service)
    started = time.monotonic()
    service.box.run("systemctl", "stop", UNIT, timeout=60)
    elapsed = time.monotonic() - started
    state = unit_state(service)
    assert (state["ActiveState"], state["SubState"], state["Result"]) == (
        "inactive", "dead", "success",
    ), state  # fmt: skip
    assert (state["ExecMainCode"], state["ExecMainStatus"]) == ("1", "0"), state  # exited, 0
    assert elapsed < 5, f"stop took {elapsed:.1f} s"
    with pytest.raises(OSError):
        http_get(f"{service.url}/-/healthy", timeout=2)
