"""Every rule a network namespace can reproduce, built for real and judged by `tcpwatch check`.

Each condition is made inside a throw-away namespace (``Netns``): per-namespace sysctls, real
listeners and clients on loopback held by helper processes (``populations`` and the small
``_HELPER`` below, whose processes are named with prctl(PR_SET_NAME)), and nftables rules that
drop SYNs or final ACKs. Then ``ip netns exec NAME python -m tcpwatch check --format json
--window 1`` runs there, and the test asserts the findings (id, severity, subject), the evidence
that matters (listener address:port, process name and pid, counts, cross-checked with ``ss``
where the kernel can say), the Nagios exit code, and that no other rule spoke.

Not reproducible here, and covered by their unit tests (tests/unit/test_rules_kernel.py) only:

- K03 (tw-recycle-enabled): ``net.ipv4.tcp_tw_recycle`` was removed in Linux 4.12, so this
  kernel cannot turn it on, and the leftover-line case reads the host's /etc/sysctl* files.
- K07 (orphans-near-limit) and K11 (tcp-memory-pressure): ``tcp_max_orphans`` and ``tcp_mem``
  and the orphan and memory counts are host-wide; only the host namespace has them, and
  changing them would change the host.

Namespaces and their populations are shared by the tests of one class (class-scoped fixtures
that build once and run every check up front); tests only read those results. Every helper
and wait is bounded; the whole module takes about a minute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from . import populations
from .netns import Netns, parse_ss, run_tcpwatch

pytestmark = pytest.mark.integration

WINDOW_SECONDS = 1.0
CHECK_TIMEOUT = 60.0
HELPER_READY_TIMEOUT = 40.0
HELPER_LIFETIME = 240.0
STATUS = {0: "OK", 1: "WARNING", 2: "CRITICAL"}

# A helper for what populations.py does not build. ``python -c _HELPER MODE JSON``: names itself
# (prctl), builds, prints ``ready {json}`` and holds its sockets until killed (bounded).
_HELPER = r"""
import ctypes, json, os, resource, select, socket, sys, time

def netstat(name):
    with open("/proc/net/netstat", encoding="ascii") as table:
        lines = table.read().splitlines()
    for header, values in zip(lines[::2], lines[1::2]):
        names, numbers = header.split(), values.split()
        if names[0] == "TcpExt:" and name in names:
            return int(numbers[names.index(name)])
    sys.exit(f"TcpExt {name} is not in /proc/net/netstat")

def sockets_in_state(port, state):
    found = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path, encoding="ascii") as table:
            next(table)
            for line in table:
                words = line.split()
                if int(words[1].rsplit(":", 1)[1], 16) == port and int(words[3], 16) == state:
                    found += 1
    return found

def ready(**info):
    print("ready " + json.dumps({"pid": os.getpid(), **info}), flush=True)

def connect_nonblocking(port):
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", port))
    return client

mode, params = sys.argv[1], json.loads(sys.argv[2])
deadline = time.monotonic() + 30.0
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(15, params["name"].encode(), 0, 0, 0) != 0:  # PR_SET_NAME
    sys.exit("prctl(PR_SET_NAME) failed")
held = []
if mode == "self_connect":
    # bind to a free port, then connect to that same address:port: TCP simultaneous open
    # with itself, as when the kernel picks the destination port as the source port.
    sock = socket.socket()
    sock.bind(("127.0.0.1", params["port"]))
    sock.connect(("127.0.0.1", params["port"]))
    held.append(sock)
    ready(inode=os.fstat(sock.fileno()).st_ino, peer=list(sock.getpeername()))
elif mode == "syn_queue":
    # A listener whose final ACKs nft drops: each connect leaves a request socket (SYN_RECV).
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", params["port"]))
    listener.listen(params["backlog"])
    held.append(listener)
    held.extend(connect_nonblocking(params["port"]) for _ in range(params["half_open"]))
    while sockets_in_state(params["port"], 3) != params["half_open"]:
        if time.monotonic() > deadline:
            sys.exit(f"SYN_RECV stayed at {sockets_in_state(params['port'], 3)}")
        time.sleep(0.02)
    ready(syn_recv=params["half_open"])
elif mode == "ticker":
    # A connect every `interval` s so a counter keeps moving during tcpwatch's window; sockets
    # older than `keep_seconds` are closed (None: all kept). Ready once the counter moved.
    start = netstat(params["counter"])
    said = False
    opened = []
    end = time.monotonic() + params["max_seconds"]
    for _ in range(params["max_connects"]):
        if time.monotonic() > end:
            break
        opened.append((time.monotonic(), connect_nonblocking(params["port"])))
        if params["keep_seconds"] is not None:
            while opened and time.monotonic() - opened[0][0] > params["keep_seconds"]:
                opened.pop(0)[1].close()
        if not said and netstat(params["counter"]) > start:
            ready(moved=netstat(params["counter"]) - start)
            said = True
        if not said and time.monotonic() > deadline:
            sys.exit(f"{params['counter']} never moved")
        time.sleep(params["interval"])
    held.extend(sock for _, sock in opened)
elif mode == "fd_hog":
    # A listener whose process also holds `files` descriptors (/dev/null): the test lowers its
    # RLIMIT_NOFILE from outside with prlimit(1).
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", params["port"]))
    listener.listen(16)
    held.append(listener)
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(params["files"])]
    ready(open_fds=len(os.listdir("/proc/self/fd")) - 1)  # minus listdir's own descriptor
else:
    sys.exit(f"unknown mode {mode}")
end = time.monotonic() + 300.0
while (left := end - time.monotonic()) > 0:
    select.select([], [], [], min(left, 60.0))
"""


# -- running tcpwatch check ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckRun:
    """One `tcpwatch check --format json` inside a namespace: exit code and parsed report."""

    exit_code: int
    report: Mapping[str, Any]

    @property
    def findings(self) -> list[dict[str, Any]]:
        findings: list[dict[str, Any]] = self.report["findings"]
        return findings

    def keys(self) -> set[tuple[str, str, str]]:
        """(id, severity, subject) of every finding."""
        return {(f["id"], f["severity"], f["subject"]) for f in self.findings}

    def one(self, rule_id: str, subject: str = "") -> dict[str, Any]:
        matches = [f for f in self.findings if f["id"] == rule_id and f["subject"] == subject]
        assert len(matches) == 1, f"expected one {rule_id} about {subject!r}; {self.describe()}"
        return matches[0]

    def describe(self) -> str:
        lines = [f"exit {self.exit_code}, findings:"]
        lines.extend(
            f"  {f['id']} {f['severity']} {f['subject']!r}: {f['title']} {f['evidence']}"
            for f in self.findings
        )
        return "\n".join(lines)


def run_check(ns: Netns, config: str | None = None) -> CheckRun:
    """`tcpwatch check --format json --window 1 [--config F]` in ``ns``, sanity-checked."""
    args = ["check", "--format", "json", "--window", f"{WINDOW_SECONDS:g}"]
    with tempfile.TemporaryDirectory(prefix="tw-check-") as scratch:
        if config is not None:
            path = os.path.join(scratch, "tcpwatch.yaml")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(config)
            args += ["--config", path]
        result = run_tcpwatch(ns, *args, timeout=CHECK_TIMEOUT)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode in STATUS, f"exit {result.returncode}; {output}"
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["schema_version"] == 2
    assert report["exit_code"] == result.returncode
    assert report["status"] == STATUS[result.returncode]
    assert report["window_seconds"] == WINDOW_SECONDS
    assert [entry["netns"] for entry in report["namespaces"]] == [ns.name]
    # A failed source would silence the rules that need it: every one must have worked.
    failed = [source for source in report["sources"] if not source["ok"]]
    assert not failed, f"sources failed: {failed}"
    for finding in report["findings"]:
        assert finding["netns"] == ns.name
        assert finding["doc"] == f"docs/rules/{finding['id']}-{finding['slug']}.md"
        assert finding["remediation"].strip(), finding
    return CheckRun(result.returncode, report)


def assert_findings(run: CheckRun, expected: set[tuple[str, str, str]], exit_code: int) -> None:
    """Exactly these (id, severity, subject) findings, once each, and this exit code."""
    assert run.keys() == expected, run.describe()
    assert len(run.findings) == len(expected), run.describe()
    assert run.exit_code == exit_code, run.describe()


def assert_evidence(finding: Mapping[str, Any], expected: Mapping[str, object]) -> None:
    evidence = finding["evidence"]
    wrong = {
        key: (evidence.get(key, "<absent>"), want)
        for key, want in expected.items()
        if evidence.get(key, "<absent>") != want
    }
    assert not wrong, f"{finding['id']} evidence (got, wanted): {wrong}; all: {evidence}"


def assert_window_evidence(finding: Mapping[str, Any]) -> None:
    """`window_seconds` is the time between the two snapshots: the window plus a poll."""
    seconds = finding["evidence"]["window_seconds"]
    assert WINDOW_SECONDS <= seconds < WINDOW_SECONDS + 5.0, finding["evidence"]


# -- building things in a namespace ----------------------------------------------------------------


def start_helper(ns: Netns, mode: str, **params: Any) -> dict[str, Any]:
    """Run ``_HELPER MODE`` in ``ns`` until it is ready; returns its ready line (pid, ...)."""
    process = ns.spawn(
        [sys.executable, "-c", _HELPER, mode, json.dumps(params)], lifetime=HELPER_LIFETIME
    )
    line = ns.read_line(process, timeout=HELPER_READY_TIMEOUT)
    assert line.startswith("ready "), f"{mode} helper said {line!r}: {ns.stderr_of(process)}"
    info: dict[str, Any] = json.loads(line[len("ready ") :])
    return info


def drop_final_acks(ns: Netns, port: int) -> None:
    """nft: drop pure ACKs to ``port``, so handshakes stop in SYN_RECV on the listener."""
    ns.nft(
        f"table inet tw_final_ack_{port} {{\n"
        "  chain input { type filter hook input priority 0; "
        f"tcp dport {port} tcp flags & (syn|ack|fin|rst) == ack drop; }}\n"
        "}\n"
    )


def process_name(pid: int) -> str:
    """The name tcpwatch reports for a process (its comm), as the host sees it."""
    with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
        return comm.read().strip()


def ss_sockets(ns: Netns, state: str | None = None) -> list[Any]:
    """``ss -tanHp`` in ``ns``, optionally only one state (tcpwatch's name: ``close_wait``).

    Filtered here: ``ss state X`` drops the State column, which the parser needs.
    """
    return [s for s in parse_ss(ns.ss("-tanHp")) if state is None or s.state == state]


def kernel_tw_default(ns: Netns) -> int:
    """The kernel's default tcp_max_tw_buckets in ``ns``: half its ehash entries."""
    return abs(int(ns.read_sysctl("net.ipv4.tcp_ehash_entries"))) // 2


@pytest.fixture(scope="class")
def class_netns(integration_prerequisites: None) -> Iterator[Netns]:
    """One namespace for a class's tests; everything in it is killed and removed afterwards."""
    with Netns() as ns:
        yield ns


# -- a healthy namespace ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Healthy:
    json_run: CheckRun
    text_exit: int
    text: str
    time_wait_seen: int
    established_seen: int


class TestHealthyNamespace:
    """Default settings and ordinary traffic: a listener with idle kept-alive connections and a
    few hundred short connections that ended in TIME_WAIT."""

    @pytest.fixture(scope="class")
    @classmethod
    def healthy(cls, class_netns: Netns) -> Healthy:
        ns = class_netns
        populations.established(ns, pairs=20, port=20001)
        populations.time_wait(ns, count=300, port=20003, closer="client")
        json_run = run_check(ns)
        text = run_tcpwatch(ns, "check", "--window", "1", timeout=CHECK_TIMEOUT)
        sockets = ss_sockets(ns)
        return Healthy(
            json_run,
            text.returncode,
            text.stdout + text.stderr,
            sum(1 for s in sockets if s.state == "time_wait" and s.peer_port == 20003),
            sum(1 for s in sockets if s.state == "established" and s.peer_port == 20001),
        )

    def test_traffic_was_there(self, healthy: Healthy) -> None:
        assert healthy.time_wait_seen == 300
        assert healthy.established_seen == 20

    def test_no_findings_and_exit_0(self, healthy: Healthy) -> None:
        assert_findings(healthy.json_run, set(), 0)
        assert healthy.json_run.report["summary"] == {"critical": 0, "warning": 0, "info": 0}

    def test_text_report_says_ok(self, healthy: Healthy) -> None:
        assert healthy.text_exit == 0, healthy.text
        assert healthy.text.splitlines()[0].startswith("TCPWATCH OK"), healthy.text
        assert "Traceback" not in healthy.text


# -- sysctl-only rules: one fresh namespace per case -----------------------------------------------

Evidence = Mapping[str, object | Callable[[Netns], object]]


@dataclass(frozen=True, slots=True)
class SysctlCase:
    sysctls: Mapping[str, str]
    expected: set[tuple[str, str]]  # (id, severity), all namespace-wide (subject "")
    exit_code: int
    evidence: Mapping[str, Evidence] = field(default_factory=dict)  # rule id -> key -> value
    problems: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rule id -> phrases
    config: str | None = None


SYSCTL_CASES: Mapping[str, SysctlCase] = {
    "K01-syncookies-off": SysctlCase(
        {"net.ipv4.tcp_syncookies": "0", "net.ipv4.tcp_max_syn_backlog": "1024"},
        {("K01", "warning")},
        1,
        {
            "K01": {
                "tcp_syncookies": 0,
                "tcp_max_syn_backlog": 1024,
                "tcp_req_q_full_drop_in_window": 0,
            }
        },
    ),
    "K02-syncookies-forced": SysctlCase(
        {"net.ipv4.tcp_syncookies": "2"},
        {("K02", "warning")},
        1,
        {"K02": {"tcp_syncookies": 2, "syncookies_sent_in_window": 0}},
    ),
    "K04-abort-on-overflow": SysctlCase(
        {"net.ipv4.tcp_abort_on_overflow": "1"},
        {("K04", "warning")},
        1,
        {"K04": {"tcp_abort_on_overflow": 1, "listen_overflows_in_window": 0}},
    ),
    "K05-somaxconn-low": SysctlCase(
        {"net.core.somaxconn": "1024"},
        {("K05", "warning")},
        1,
        {"K05": {"somaxconn": 1024, "minimum": 4096, "listeners_at_somaxconn": 0}},
    ),
    "K05-silent-at-configured-minimum": SysctlCase(
        {"net.core.somaxconn": "1024"},
        set(),
        0,
        config="rules:\n  K05:\n    minimum: 1024\n",
    ),
    "K06-buckets-lowered": SysctlCase(
        {"net.ipv4.tcp_max_tw_buckets": "1024"},
        {("K06", "warning")},
        1,
        {
            "K06": {
                "tcp_max_tw_buckets": 1024,
                "kernel_default": kernel_tw_default,
                "time_wait_sockets": 0,
                "tcp_time_wait_overflow_in_window": 0,
            }
        },
        {"K06": ("lowered from the kernel default",)},
    ),
    "K08-narrow-same-parity": SysctlCase(
        {"net.ipv4.ip_local_port_range": "40000 40998"},
        {("K08", "warning")},
        1,
        {
            "K08": {
                "port_range_low": 40000,
                "port_range_high": 40998,
                "ports": 999,
                "ip_unprivileged_port_start": 1024,
            }
        },
        {"K08": ("only 999 ports", "same parity")},
    ),
    "K08-parity-only-is-info": SysctlCase(
        {"net.ipv4.ip_local_port_range": "32768 60998"},
        {("K08", "info")},
        0,
        {"K08": {"port_range_low": 32768, "port_range_high": 60998, "ports": 28231}},
        {"K08": ("same parity",)},
    ),
    "K09-keepalive-above-idle-timeout": SysctlCase(
        {},
        {("K09", "warning")},
        1,
        {"K09": {"tcp_keepalive_time": 7200, "idle_timeout": 350, "suggested_keepalive_time": 280}},
        config="rules:\n  K09:\n    idle_timeout: 350\n",
    ),
    "K09-silent-below-idle-timeout": SysctlCase(
        {"net.ipv4.tcp_keepalive_time": "300"},
        set(),
        0,
        config="rules:\n  K09:\n    idle_timeout: 350\n",
    ),
    "K10-fin-timeout-changed": SysctlCase(
        {"net.ipv4.tcp_fin_timeout": "30"},
        {("K10", "info")},
        0,
        {"K10": {"tcp_fin_timeout": 30, "kernel_default": 60, "time_wait_seconds": 60}},
    ),
}


@pytest.mark.parametrize("case", SYSCTL_CASES.values(), ids=SYSCTL_CASES.keys())
def test_sysctl_rule(netns: Netns, case: SysctlCase) -> None:
    for name, value in case.sysctls.items():
        netns.sysctl(name, value)
    run = run_check(netns, case.config)
    assert_findings(run, {(rule_id, sev, "") for rule_id, sev in case.expected}, case.exit_code)
    for rule_id, evidence in case.evidence.items():
        wanted = {key: want(netns) if callable(want) else want for key, want in evidence.items()}
        assert_evidence(run.one(rule_id), wanted)
    for rule_id, phrases in case.problems.items():
        problems = run.one(rule_id)["evidence"]["problems"]
        assert all(phrase in problems for phrase in phrases), problems
    for finding in run.findings:
        if any(key.endswith("_in_window") for key in finding["evidence"]):
            assert_window_evidence(finding)


def test_k06_time_wait_near_lowered_limit(netns: Netns) -> None:
    """190 TIME_WAIT sockets against tcp_max_tw_buckets = 200: lowered and 95 % used."""
    netns.sysctl("net.ipv4.tcp_max_tw_buckets", 200)
    populations.time_wait(netns, count=190, port=20003, closer="client")
    run = run_check(netns)
    assert_findings(run, {("K06", "warning", "")}, 1)
    finding = run.one("K06")
    assert_evidence(
        finding,
        {
            "tcp_max_tw_buckets": 200,
            "kernel_default": kernel_tw_default(netns),
            "time_wait_sockets": 190,
            "usage_ratio": 0.95,
        },
    )
    assert "lowered from the kernel default" in finding["evidence"]["problems"]
    assert "190 TIME_WAIT sockets use 95%" in finding["evidence"]["problems"]


def test_k01_critical_while_listener_drops_syns(netns: Netns) -> None:
    """tcp_syncookies = 0 and a listener at the no-cookie limit (3/4 of tcp_max_syn_backlog)."""
    netns.sysctl("net.ipv4.tcp_syncookies", 0)
    netns.sysctl("net.ipv4.tcp_max_syn_backlog", 16)
    half_open = populations.syn_recv(netns, count=12, port=20007)
    run = run_check(netns)
    assert_findings(run, {("K01", "critical", ""), ("Q04", "warning", "127.0.0.1:20007")}, 2)
    assert_evidence(
        run.one("K01"),
        {
            "tcp_syncookies": 0,
            "tcp_max_syn_backlog": 16,
            "listeners_dropping_syns": "127.0.0.1:20007 (12)",
        },
    )
    pid = half_open.info["pid"]
    assert_evidence(
        run.one("Q04", "127.0.0.1:20007"),
        {
            "listener": "127.0.0.1:20007",
            "syn_recv": 12,
            "syn_queue_limit": 12,  # 16 - 16/4: the no-cookie limit, below the backlog
            "fill_ratio": 1.0,
            "process": process_name(pid),
            "pid": pid,
            "tcp_syncookies": 0,
        },
    )


# -- accept queues: Q01, Q02 -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FullQueue:
    quiet: CheckRun  # the queue is full, nothing new arrives
    overflowing: CheckRun  # a client keeps connecting and is dropped
    pid: int
    recv_q: int
    send_q: int


class TestAcceptQueueFull:
    PORT = 20008

    @pytest.fixture(scope="class")
    @classmethod
    def full(cls, class_netns: Netns) -> FullQueue:
        ns = class_netns
        population = populations.accept_queue_full(ns, port=cls.PORT, backlog=4, overflowing=3)
        quiet = run_check(ns)
        (listener,) = [s for s in parse_ss(ns.ss("-ltnH")) if s.local_port == cls.PORT]
        start_helper(
            ns,
            "ticker",
            name="tw-impatient",
            port=cls.PORT,
            counter="ListenOverflows",
            interval=0.05,
            keep_seconds=0.5,  # ~10 SYN_SENT at a time: below S03's 20
            max_seconds=90.0,
            max_connects=2000,
        )
        overflowing = run_check(ns)
        return FullQueue(
            quiet, overflowing, population.info["pid"], listener.recv_q, listener.send_q
        )

    def test_q01_critical_names_listener_and_process(self, full: FullQueue) -> None:
        assert (full.recv_q, full.send_q) == (5, 4)  # ss: backlog + 1 queued, backlog 4
        assert_findings(full.quiet, {("Q01", "critical", f"127.0.0.1:{self.PORT}")}, 2)
        assert_evidence(
            full.quiet.one("Q01", f"127.0.0.1:{self.PORT}"),
            {
                "listener": f"127.0.0.1:{self.PORT}",
                "queue_length": full.recv_q,
                "queue_max": full.send_q,
                "fill_ratio": 1.25,
                "process": process_name(full.pid),
                "pid": full.pid,
                "queue_length_at_window_start": 5,
                "somaxconn": 4096,
                "listen_overflows_in_window": 0,
            },
        )

    def test_q02_silent_when_overflows_predate_the_window(self, full: FullQueue) -> None:
        assert "Q02" not in {f["id"] for f in full.quiet.findings}

    def test_q02_fires_while_connections_are_dropped(self, full: FullQueue) -> None:
        subject = f"127.0.0.1:{self.PORT}"
        # The clients give up on SYNs the full listener dropped: their connects time out (C01),
        # and C01 names the full local listener as the cause, not the network.
        assert_findings(
            full.overflowing,
            {
                ("Q01", "critical", subject),
                ("Q02", "warning", subject),
                ("C01", "critical", subject),
            },
            2,
        )
        c01 = full.overflowing.one("C01", subject)
        assert_evidence(
            c01, {"local_listener": subject, "full_queue": "accept", "cause": "listener dropping"}
        )
        # Q02 names the listener that dropped and its owner (its own drop counter).
        finding = full.overflowing.one("Q02", subject)
        evidence = finding["evidence"]
        assert evidence["listen_overflows_in_window"] >= 1, evidence
        assert evidence["listen_drops_in_window"] >= evidence["listen_overflows_in_window"]
        assert evidence["drops_in_window"] >= 1 and evidence["drops_per_second"] > 0
        assert_window_evidence(finding)
        assert_evidence(
            finding,
            {
                "listener": subject,
                "process": process_name(full.pid),
                "pid": full.pid,
                "cause": "accept",
            },
        )


# -- Q03: backlog capped at somaxconn --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capped:
    run: CheckRun
    disabled: CheckRun  # the same namespace with `rules: {Q03: false}`
    busy_pid: int


class TestBacklogCapped:
    BUSY = 20010  # listen(64) cut to 8, 5 connections waiting: 62 % full
    IDLE = 20001  # listen(16) cut to 8, empty

    @pytest.fixture(scope="class")
    @classmethod
    def capped(cls, class_netns: Netns) -> Capped:
        ns = class_netns
        ns.sysctl("net.core.somaxconn", 8)
        busy = populations.reuseport(ns, port=cls.BUSY, backlogs=(64,), clients=5)
        populations.established(ns, pairs=0, port=cls.IDLE)
        run = run_check(ns)
        disabled = run_check(ns, "rules:\n  Q03: false\n")
        return Capped(run, disabled, busy.info["pid"])

    def test_q03_warning_for_the_busy_listener_only(self, capped: Capped) -> None:
        busy = f"127.0.0.1:{self.BUSY}"
        # The idle listener is capped too, but a calm capped queue says nothing (Go servers and
        # listen(fd, -1) ask for exactly somaxconn): no Q03 for it.
        assert_findings(capped.run, {("K05", "warning", ""), ("Q03", "warning", busy)}, 1)
        assert_evidence(
            capped.run.one("Q03", busy),
            {
                "listener": busy,
                "queue_max": 8,
                "somaxconn": 8,
                "queue_length": 5,
                "fill_ratio": 0.625,
                "process": process_name(capped.busy_pid),
                "pid": capped.busy_pid,
            },
        )

    def test_k05_lists_the_capped_listeners(self, capped: Capped) -> None:
        assert_evidence(
            capped.run.one("K05"),
            {
                "somaxconn": 8,
                "listeners_at_somaxconn": 2,
                "listeners_capped": f"127.0.0.1:{self.IDLE}, 127.0.0.1:{self.BUSY}",
            },
        )

    def test_config_disables_q03(self, capped: Capped) -> None:
        assert_findings(capped.disabled, {("K05", "warning", "")}, 1)


# -- Q04: SYN queue --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SynQueue:
    half_open: CheckRun  # 7 half-open of backlog 8
    flooded: CheckRun  # then a SYN every 50 ms: the queue overflows into cookies
    pid: int


class TestSynQueuePressure:
    PORT = 20007

    @pytest.fixture(scope="class")
    @classmethod
    def syn_queue(cls, class_netns: Netns) -> SynQueue:
        ns = class_netns
        drop_final_acks(ns, cls.PORT)
        info = start_helper(ns, "syn_queue", name="tw-synq", port=cls.PORT, backlog=8, half_open=7)
        half_open = run_check(ns)
        start_helper(
            ns,
            "ticker",
            name="tw-syn-burst",
            port=cls.PORT,
            counter="SyncookiesSent",
            interval=0.05,
            keep_seconds=None,
            max_seconds=90.0,
            max_connects=2000,
        )
        flooded = run_check(ns)
        return SynQueue(half_open, flooded, info["pid"])

    def test_listener_at_80_percent_of_its_syn_queue(self, syn_queue: SynQueue) -> None:
        subject = f"127.0.0.1:{self.PORT}"
        assert_findings(syn_queue.half_open, {("Q04", "warning", subject)}, 1)
        assert_evidence(
            syn_queue.half_open.one("Q04", subject),
            {
                "listener": subject,
                "syn_recv": 7,
                "syn_queue_limit": 8,
                "fill_ratio": 0.875,
                "process": "tw-synq",
                "pid": syn_queue.pid,
                "tcp_syncookies": 1,
            },
        )

    def test_syncookies_sent_during_the_window(self, syn_queue: SynQueue) -> None:
        subject = f"127.0.0.1:{self.PORT}"
        assert_findings(syn_queue.flooded, {("Q04", "warning", subject), ("Q04", "warning", "")}, 1)
        finding = syn_queue.flooded.one("Q04")
        evidence = finding["evidence"]
        assert evidence["syncookies_sent_in_window"] >= 1, evidence
        assert evidence["tcp_req_q_full_do_cookies_in_window"] >= 1, evidence
        assert evidence["tcp_req_q_full_drop_in_window"] == 0, evidence
        assert evidence["tcp_syncookies"] == 1
        assert_window_evidence(finding)
        listener = syn_queue.flooded.one("Q04", subject)["evidence"]
        assert listener["syn_recv"] >= 7 and listener["pid"] == syn_queue.pid, listener


# -- S rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leak:
    run: CheckRun
    leaker_pid: int
    tidy_pid: int
    ss_close_wait_by_pid: Mapping[int, int]


class TestCloseWaitLeak:
    @pytest.fixture(scope="class")
    @classmethod
    def leak(cls, class_netns: Netns) -> Leak:
        ns = class_netns
        leaker = populations.close_wait(ns, count=60, port=20005, process_name="tw-leaker")
        tidy = populations.close_wait(ns, count=10, port=20015, process_name="tw-tidy")
        run = run_check(ns)
        by_pid: dict[int, int] = {}
        for sock in ss_sockets(ns, "close_wait"):
            for owner in sock.processes:
                by_pid[owner.pid] = by_pid.get(owner.pid, 0) + 1
        return Leak(run, leaker.info["pid"], tidy.info["pid"], by_pid)

    def test_s01_names_the_leaking_process(self, leak: Leak) -> None:
        subject = "tw-leaker"  # the process name: its pid is evidence, a restart keeps it
        assert_findings(leak.run, {("S01", "warning", subject)}, 1)
        assert leak.ss_close_wait_by_pid.get(leak.leaker_pid) == 60
        assert_evidence(
            leak.run.one("S01", subject),
            {
                "process": "tw-leaker",
                "pid": leak.leaker_pid,
                "close_wait_sockets": 60,
                "still_close_wait_since_window_start": 60,
            },
        )

    def test_s01_silent_for_a_process_with_few(self, leak: Leak) -> None:
        assert leak.ss_close_wait_by_pid.get(leak.tidy_pid) == 10
        assert not any("tw-tidy" in f["subject"] for f in leak.run.findings), leak.run.describe()


@dataclass(frozen=True, slots=True)
class SelfConnected:
    run: CheckRun
    info: Mapping[str, Any]


class TestSelfConnect:
    PORT = 45678  # inside the default ip_local_port_range, where the kernel picks source ports

    @pytest.fixture(scope="class")
    @classmethod
    def self_connected(cls, class_netns: Netns) -> SelfConnected:
        info = start_helper(class_netns, "self_connect", name="tw-selfconn", port=cls.PORT)
        assert info["peer"] == ["127.0.0.1", cls.PORT]
        (sock,) = ss_sockets(class_netns, "established")
        assert (sock.local_port, sock.peer_port) == (cls.PORT, cls.PORT)
        return SelfConnected(run_check(class_netns), info)

    def test_s02_critical(self, self_connected: SelfConnected) -> None:
        subject = f"127.0.0.1:{self.PORT}"
        assert_findings(self_connected.run, {("S02", "critical", subject)}, 2)
        assert_evidence(
            self_connected.run.one("S02", subject),
            {
                "address": "127.0.0.1",
                "port": self.PORT,
                "state": "established",
                "inode": self_connected.info["inode"],
            },
        )

    def test_s02_names_the_process(self, self_connected: SelfConnected) -> None:
        assert_evidence(
            self_connected.run.one("S02", f"127.0.0.1:{self.PORT}"),
            {"process": "tw-selfconn", "pid": self_connected.info["pid"]},
        )


def test_s02_self_connect_below_the_ephemeral_range(netns: Netns) -> None:
    """A socket that bind()s a port below the range and connects to itself is an inbound-looking
    ESTABLISHED socket: the default (derived) count never copies those out, so S02 sees it only
    with `collect.established: dumped` (docs/rules/S02-self-connect.md says so)."""
    info = start_helper(netns, "self_connect", name="tw-selfconn", port=20050)
    assert info["peer"] == ["127.0.0.1", 20050]
    assert run_check(netns).findings == []
    run = run_check(netns, "collect:\n  established: dumped\n")
    assert_findings(run, {("S02", "critical", "127.0.0.1:20050")}, 2)


def lower_nofile(pid: int, soft: int, hard: int) -> None:
    """prlimit(1) on a running process, as an operator would (it may go below what is open)."""
    subprocess.run(
        ["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True, timeout=10
    )
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    assert line.split()[3:5] == [str(soft), str(hard)], line


def test_q05_listener_owner_near_its_fd_limit(netns: Netns) -> None:
    """A real process with a listener and 100 open files, its RLIMIT_NOFILE lowered with
    prlimit: warning at 80% of the soft limit, critical at it (accept() would fail with
    EMFILE), nothing with room; evidence as psutil and /proc see it."""
    info = start_helper(netns, "fd_hog", name="tw-fdhog", port=20060, files=100)
    pid, open_fds = info["pid"], info["open_fds"]
    assert len(os.listdir(f"/proc/{pid}/fd")) == open_fds
    subject = "tw-fdhog"  # never the pid (a restart must not make a new series)
    assert not any(f["id"] == "Q05" for f in run_check(netns).findings)

    soft = open_fds * 100 // 85  # open_fds is 85% of it: a warning
    lower_nofile(pid, soft, 4096)
    run = run_check(netns)
    assert_findings(run, {("Q05", "warning", subject)}, 1)
    assert_evidence(
        run.one("Q05", subject),
        {
            "process": "tw-fdhog",
            "pid": pid,
            "user": "root",
            "open_fds": open_fds,
            "max_fds": soft,
            "max_fds_hard": 4096,
            "fd_ratio": round(open_fds / soft, 4),
            "listeners": "127.0.0.1:20060",
            "accept_queue_length": 0,
        },
    )
    started = run.one("Q05", subject)["evidence"]["started_at"]
    assert time.time() - HELPER_LIFETIME < started <= time.time(), started

    lower_nofile(pid, open_fds, open_fds)  # full: the next accept() gets EMFILE
    run = run_check(netns)
    assert_findings(run, {("Q05", "critical", subject)}, 2)
    finding = run.one("Q05", subject)
    assert_evidence(finding, {"open_fds": open_fds, "max_fds": open_fds, "fd_ratio": 1.0})
    assert f"prlimit --pid {pid} --nofile=" in finding["remediation"]
    assert "LimitNOFILE=" in finding["remediation"]


@dataclass(frozen=True, slots=True)
class Unreachable:
    run: CheckRun
    ss_syn_sent: Mapping[int, int]  # destination port -> SYN_SENT sockets


class TestSynSentPileup:
    @pytest.fixture(scope="class")
    @classmethod
    def unreachable(cls, class_netns: Netns) -> Unreachable:
        ns = class_netns
        populations.syn_sent(ns, count=25, port=20006)
        populations.syn_sent(ns, count=5, port=20016)
        run = run_check(ns)
        counts: dict[int, int] = {}
        for sock in ss_sockets(ns, "syn_sent"):
            if sock.peer_port is not None:
                counts[sock.peer_port] = counts.get(sock.peer_port, 0) + 1
        return Unreachable(run, counts)

    def test_s03_names_the_destination(self, unreachable: Unreachable) -> None:
        assert unreachable.ss_syn_sent == {20006: 25, 20016: 5}
        assert_findings(unreachable.run, {("S03", "warning", "127.0.0.1:20006")}, 1)
        assert_evidence(
            unreachable.run.one("S03", "127.0.0.1:20006"),
            {
                "destination": "127.0.0.1:20006",
                "syn_sent_sockets": 25,
                "syn_sent_at_window_start": 25,
            },
        )


# -- P rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exhausted:
    run: CheckRun
    ss_time_wait: Mapping[int, int]  # destination port -> TIME_WAIT sockets


class TestEphemeralExhaustion:
    """Short connections to two destinations in a 200-port ip_local_port_range."""

    @pytest.fixture(scope="class")
    @classmethod
    def exhausted(cls, class_netns: Netns) -> Exhausted:
        ns = class_netns
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 40199")
        populations.time_wait(ns, count=170, port=20003, closer="client")  # 85 %: critical
        populations.time_wait(ns, count=110, port=20004, closer="client")  # 55 %: warning
        run = run_check(ns)
        counts: dict[int, int] = {}
        for sock in ss_sockets(ns, "time_wait"):
            if sock.peer_port is not None and 40000 <= sock.local_port <= 40199:
                counts[sock.peer_port] = counts.get(sock.peer_port, 0) + 1
        return Exhausted(run, counts)

    def test_p01_severity_per_destination(self, exhausted: Exhausted) -> None:
        assert exhausted.ss_time_wait == {20003: 170, 20004: 110}
        assert_findings(
            exhausted.run,
            {
                ("P01", "critical", "127.0.0.1 -> 127.0.0.1:20003"),
                ("P01", "warning", "127.0.0.1 -> 127.0.0.1:20004"),
                ("K08", "warning", ""),  # the narrowed range is itself a finding
            },
            2,
        )
        common = {"source": "127.0.0.1", "ports_available": 200, "port_range": "40000-40199"}
        assert_evidence(
            exhausted.run.one("P01", "127.0.0.1 -> 127.0.0.1:20003"),
            {
                **common,
                "destination": "127.0.0.1:20003",
                "sockets": 170,
                "time_wait": 170,
                "usage_ratio": 0.85,
                "tcp_tw_reuse": 2,
            },
        )
        assert_evidence(
            exhausted.run.one("P01", "127.0.0.1 -> 127.0.0.1:20004"),
            {**common, "destination": "127.0.0.1:20004", "sockets": 110, "usage_ratio": 0.55},
        )
        assert_evidence(exhausted.run.one("K08"), {"ports": 200})


def test_p02_listener_inside_the_range(netns: Netns) -> None:
    """Listeners at 45000 (in range), 45001 (in range, reserved) and 20001 (below the range)."""
    netns.sysctl("net.ipv4.ip_local_reserved_ports", "45001")
    inside = populations.established(netns, pairs=0, port=45000)
    populations.established(netns, pairs=0, port=45001)
    populations.established(netns, pairs=0, port=20001)
    run = run_check(netns)
    assert_findings(run, {("P02", "warning", "127.0.0.1:45000")}, 1)
    pid = inside.info["pid"]
    assert_evidence(
        run.one("P02", "127.0.0.1:45000"),
        {
            "listener": "127.0.0.1:45000",
            "port": 45000,
            "port_range": "32768-60999",
            "process": process_name(pid),
            "pid": pid,
        },
    )
    # The fix reserves the port and keeps the reservation already there (writing replaces it).
    remediation = run.one("P02", "127.0.0.1:45000")["remediation"]
    command = re.search(r"sysctl -w net\.ipv4\.ip_local_reserved_ports=([\d,-]+)", remediation)
    assert command is not None, remediation
    assert {"45000", "45001"} <= set(command.group(1).split(",")), remediation


# -- several problems at once ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Misconfigured:
    run: CheckRun
    full_pid: int
    leaker_pid: int


class TestMisconfiguredNamespace:
    """somaxconn 16, SYN cookies off, fin_timeout 30, a 1000-port range, a keepalive longer than
    the declared idle timeout, a full capped listener and a process leaking CLOSE_WAIT."""

    FULL = 20010
    LEAKY = 20005

    @pytest.fixture(scope="class")
    @classmethod
    def misconfigured(cls, class_netns: Netns) -> Misconfigured:
        ns = class_netns
        for name, value in {
            "net.core.somaxconn": "16",
            "net.ipv4.tcp_syncookies": "0",
            "net.ipv4.tcp_fin_timeout": "30",
            "net.ipv4.ip_local_port_range": "40000 40999",
        }.items():
            ns.sysctl(name, value)
        # listen(128) cut to 16; 17 connections queued (the kernel admits backlog + 1).
        full = populations.reuseport(ns, port=cls.FULL, backlogs=(128,), clients=17)
        leaker = populations.close_wait(ns, count=60, port=cls.LEAKY, process_name="tw-leaker")
        run = run_check(ns, "rules:\n  K09:\n    idle_timeout: 350\n")
        return Misconfigured(run, full.info["pid"], leaker.info["pid"])

    def test_every_problem_found_and_exit_critical(self, misconfigured: Misconfigured) -> None:
        full = f"127.0.0.1:{self.FULL}"
        assert_findings(
            misconfigured.run,
            {
                ("K01", "warning", ""),
                ("K05", "warning", ""),
                ("K08", "warning", ""),
                ("K09", "warning", ""),
                ("K10", "info", ""),
                ("Q01", "critical", full),
                ("Q03", "warning", full),  # not the leaky listener's: it accepts everything
                ("S01", "warning", "tw-leaker"),
            },
            2,
        )
        assert misconfigured.run.report["summary"] == {"critical": 1, "warning": 6, "info": 1}
        # Critical first, as documented.
        assert misconfigured.run.findings[0]["id"] == "Q01"

    def test_evidence_names_listener_and_process(self, misconfigured: Misconfigured) -> None:
        full = f"127.0.0.1:{self.FULL}"
        pid = misconfigured.full_pid
        assert_evidence(
            misconfigured.run.one("Q01", full),
            {
                "listener": full,
                "queue_length": 17,
                "queue_max": 16,
                "fill_ratio": 1.0625,
                "process": process_name(pid),
                "pid": pid,
                "somaxconn": 16,
            },
        )
        assert f"{process_name(pid)}[{pid}]" in misconfigured.run.one("Q01", full)["title"]
        assert_evidence(
            misconfigured.run.one("S01", "tw-leaker"),
            {"process": "tw-leaker", "pid": misconfigured.leaker_pid, "close_wait_sockets": 60},
        )
        assert_evidence(
            misconfigured.run.one("K05"),
            {
                "somaxconn": 16,
                "listeners_at_somaxconn": 2,
                "listeners_capped": f"127.0.0.1:{self.LEAKY}, {full}",
            },
        )
        assert_evidence(misconfigured.run.one("K08"), {"ports": 1000})
        assert_evidence(misconfigured.run.one("K09"), {"idle_timeout": 350})
        assert_evidence(misconfigured.run.one("K01"), {"tcp_syncookies": 0})
