"""Series identities survive a restart of a listener's owner (issue 22, item 4).

A real service in a namespace nobody named (``unshare --net``, as a hand-made sandbox or a
systemd ``PrivateNetwork=`` unit makes one) owns a listener, holds CLOSE_WAIT sockets and sits
near its descriptor limit, so every family that names a process has a series and rules S01 and
Q05 fire about it. A second process keeps the namespace alive while the service is killed and
started again under a new pid. A real ``tcpwatch serve``, running in a throw-away namespace of its
own and polling the service's, is scraped before and after: the set of series (name and labels)
must be the same, but for the pid on ``tcpwatch_listener_info``.

Before the fix the namespace was called ``pid:<lowest pid in it>`` (the service's pid, then the
keeper's), findings about a process had ``name[pid]`` as subject and the described-owner gauges
carried ``pid``: every series of the namespace changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import REPO_ROOT, Netns, run_tcpwatch, tcpwatch_env
from tests.integration.test_serve import Samples, Served, matching, start_serve

pytestmark = pytest.mark.integration

NAME = "tw-stable"  # the service's process name (comm), the identity that must survive
PORT = 20090  # the service's listener, in its own namespace (below the ephemeral range)
HELD = 8  # CLOSE_WAIT sockets it holds: S01 fires from 5 (configured below)
SERVE_PORT = 19479  # tcpwatch serve's, inside the test's own ip netns
LIFETIME = 240.0  # seconds any helper lives at most

# A service: listener on 127.0.0.1:PORT, HELD connections to itself whose client side it closes
# (so it holds them in CLOSE_WAIT), and a soft RLIMIT_NOFILE that puts it at 80-90 % of it (a Q05
# warning). Prints its pid, descriptors and limit, then waits.
SERVICE = """
import ctypes, json, os, resource, select, socket, sys, time
name, port, held, lifetime = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if ctypes.CDLL(None, use_errno=True).prctl(15, name.encode(), 0, 0, 0) != 0:  # PR_SET_NAME
    raise SystemExit("prctl(PR_SET_NAME) failed")
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
servers = []
for _ in range(held):
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server, _ = listener.accept()
    client.close()
    servers.append(server)
for server in servers:
    server.settimeout(10)
    if server.recv(1) != b"":
        raise SystemExit("expected the peer's FIN")
open_fds = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
soft = open_fds * 10 // 9 + 1
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(json.dumps({"pid": os.getpid(), "open_fds": open_fds, "soft": soft}), flush=True)
end = time.monotonic() + lifetime
while (left := end - time.monotonic()) > 0:
    select.select([], [], [], left)
"""


class Helpers:
    """Processes the test starts, each in its own session, all killed on the way out."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            argv,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started.append(process)
        return process

    def service(self, enter: list[str]) -> dict[str, Any]:
        """The service started through ``enter`` (a command that runs argv in the namespace)."""
        argv = [sys.executable, "-c", SERVICE, NAME, str(PORT), str(HELD), f"{LIFETIME:g}"]
        process = self.start([*enter, *argv])
        assert process.stdout is not None
        line = process.stdout.readline()  # bounded: the service's own timeouts are 10 s
        if not line:
            process.wait(timeout=10)
            assert process.stderr is not None
            raise AssertionError(f"the service did not start: {process.stderr.read()}")
        info: dict[str, Any] = json.loads(line)
        assert info["pid"] == process.pid  # unshare and nsenter exec it: the pid is its own
        info["process"] = process
        return info

    def close(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def helpers() -> Iterator[Helpers]:
    started = Helpers()
    try:
        yield started
    finally:
        started.close()


def net_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def wait_until_in(pid: int, inode: int, comm: str, seconds: float = 10.0) -> None:
    """Until ``pid`` has entered the namespace and exec()ed ``comm`` (nsenter setns()es, then
    execs)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            current = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
            if net_inode(pid) == inode and current == comm:
                return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not become {comm} in ns:{inode} within {seconds} s")


def lowest_member(inode: int) -> int:
    """What the old naming used: the lowest pid in the namespace."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if net_inode(int(entry)) == inode:
                    members.append(int(entry))
    return min(members)


def unnamed_namespace_with_service(started: Helpers) -> tuple[int, dict[str, Any]]:
    """``unshare --net``: lo up, then the service, the namespace's first process."""
    up_then_exec = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    first = started.service(up_then_exec)
    inode = net_inode(first["pid"])
    assert inode != net_inode(os.getpid())
    return inode, first


def identities(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    return set(samples)


def without_pid(keys: set[tuple[str, frozenset[tuple[str, str]]]]) -> set[tuple[str, Any]]:
    return {(name, frozenset(kv for kv in labels if kv[0] != "pid")) for name, labels in keys}


def settled(served: Served) -> Samples:
    """A scrape of a poll that started after everything so far had happened."""
    return served.wait_for_polls(served.polls() + 1)


def test_a_restarted_listener_owner_keeps_every_series_but_the_info_pid(
    netns: Netns, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    # lifecycle and tracepoints off: the restart itself closes connections and the new service
    # makes its own, whose peers and destinations would be new series (events, counted from
    # the daemon's start) for a reason that has nothing to do with pids. A window of one
    # poll: S01 counts the CLOSE_WAIT sockets that lasted through it, so the restarted
    # service's are judged on the second poll after the restart.
    config.write_text(
        "collect:\n  disabled_sources: [lifecycle, tracepoints]\n"
        "rules:\n  window: 1s\n  S01: {warning: 5}\n",
        encoding="utf-8",
    )
    with helpers() as started:
        inode, first = unnamed_namespace_with_service(started)
        name = f"ns:{inode}"
        served = start_serve(
            netns,
            tmp_path / "serve.log",
            *("--listen", f"127.0.0.1:{SERVE_PORT}", "--interval", "1"),
            *("--netns", name, "--config", str(config)),
        )
        served.port = SERVE_PORT
        try:
            served.wait_ready()
            before = settled(served)
            lowest_before = lowest_member(inode)

            keeper = started.start(
                ["nsenter", f"--net=/proc/{first['pid']}/ns/net", "sleep", "240"]
            )
            wait_until_in(keeper.pid, inode, "sleep")  # else the namespace dies with the service
            os.kill(first["pid"], signal.SIGKILL)
            first["process"].wait(timeout=10)
            second = started.service(["nsenter", f"--net=/proc/{keeper.pid}/ns/net", "--"])
            assert net_inode(second["pid"]) == inode and second["pid"] != first["pid"]
            settled(served)  # the first poll that sees the new service's CLOSE_WAIT
            after = settled(served)
            lowest_after = lowest_member(inode)
            log = served.log()
        finally:
            served.process.kill()
            served.process.wait(timeout=10)
    assert "Traceback" not in log, log
    # What the old names would have been: the lowest pid changed with the restart.
    assert (lowest_before, lowest_after) == (first["pid"], keeper.pid)

    # The scenario is what it should be, before and after: the service is seen, it owns the
    # listener, its described descriptors are its own, and S01 and Q05 fire about it.
    for samples, service in ((before, first), (after, second)):
        listener = {"netns": name, "address": "127.0.0.1", "port": str(PORT), "socket": "0"}
        [owner] = matching(samples, "tcpwatch_listener_info", **listener)
        assert dict(owner)["process"] == NAME and dict(owner)["pid"] == str(service["pid"])
        fds = matching(samples, "tcpwatch_process_open_fds", netns=name, process=NAME)
        assert list(fds.values()) == [service["open_fds"]]
        limit = matching(samples, "tcpwatch_process_max_fds", netns=name, process=NAME)
        assert list(limit.values()) == [service["soft"]]
        held = matching(samples, "tcpwatch_process_sockets", process=NAME, state="close_wait")
        assert list(held.values()) == [HELD]
        findings = {
            (dict(labels)["id"], dict(labels)["subject"])
            for labels in matching(samples, "tcpwatch_finding", netns=name)
        }
        assert {("S01", NAME), ("Q05", NAME)} <= findings, findings
        assert {dict(labels)["netns"] for _, labels in samples if dict(labels).get("netns")} == {
            name
        }

    # Every series is the one it was; only the listener's info changed, and only its pid.
    changed = identities(before) ^ identities(after)
    assert {metric for metric, _ in changed} == {"tcpwatch_listener_info"}, sorted(changed)
    assert without_pid(identities(before)) == without_pid(identities(after))


def test_the_fix_for_an_unnamed_namespace_acts_in_that_namespace(netns: Netns) -> None:
    """K05's fix, as printed for ``ns:<inode>``, run for real: it changes somaxconn there and
    nowhere else. Before running it, the namespace it would enter is checked to be ours."""
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as handle:
        host_value = handle.read().strip()
    with helpers() as started:
        inode, service = unnamed_namespace_with_service(started)
        enter = ["nsenter", f"--net=/proc/{service['pid']}/ns/net", "--"]
        subprocess.run([*enter, "sysctl", "-qw", "net.core.somaxconn=1024"], check=True)
        result = run_tcpwatch(netns, "check", "--netns", f"ns:{inode}", "--format", "json")
        assert result.returncode in (1, 2), result.stderr
        [k05] = [f for f in json.loads(result.stdout)["findings"] if f["id"] == "K05"]
        assert k05["netns"] == f"ns:{inode}"
        fix = k05["remediation"].splitlines()[0]
        lsns = f"lsns -n -o PID -t net {inode}"
        assert fix.startswith(f"nsenter -t $({lsns}) --net sysctl -w net.core.somaxconn="), fix
        found = subprocess.run(lsns.split(), capture_output=True, text=True, check=True, timeout=30)
        assert net_inode(int(found.stdout)) == inode
        subprocess.run(
            ["sh", "-c", fix], check=True, timeout=30, env=tcpwatch_env(), cwd=str(REPO_ROOT)
        )
        now = subprocess.run(
            [*enter, "sysctl", "-n", "net.core.somaxconn"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        assert now == fix.rpartition("=")[2] != "1024"
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as handle:
        assert handle.read().strip() == host_value
