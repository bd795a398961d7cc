"""`tcpwatch serve` for real: the daemon as a process in a throw-away namespace, scraped over HTTP.

Each test starts ``python -m tcpwatch serve`` inside its own namespace (next to known socket
populations), scrapes it from inside that namespace and compares the numbers with ``ss`` and
``nstat`` there; it sends SIGHUP with a changed and with a broken config, SIGTERM/SIGINT with a
stopwatch, and checks that every startup problem is one line and exit code 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_cli_conventions import parse_logfmt

from . import populations
from .netns import REPO_ROOT, Netns, parse_ss, run_tcpwatch, tcpwatch_env

pytestmark = pytest.mark.integration

PORT = 19477  # the namespace is fresh, so any port is free
READY_TIMEOUT = 30.0
STOP_LIMIT = 2.0

# Scrapes from inside the namespace (the daemon listens on its loopback). Prints the status line,
# then the body.
_SCRAPE = """
import http.client, sys
connection = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
connection.request("GET", sys.argv[3], headers={"Connection": "close"})
response = connection.getresponse()
sys.stdout.write(f"{response.status}\\n" + response.read().decode())
"""


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
StartServe = Callable[..., "Served"]


def parse_samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def matching(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    wanted = set(labels.items())
    return {key: v for (n, key), v in samples.items() if n == name and wanted <= key}


@dataclass
class Served:
    """A `tcpwatch serve` process inside a namespace."""

    ns: Netns
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = PORT

    def get(self, path: str = "/metrics") -> tuple[int, str]:
        result = self.ns.run(
            sys.executable, "-c", _SCRAPE, "127.0.0.1", str(self.port), path, timeout=30
        )
        status, _, body = result.stdout.partition("\n")
        return int(status), body

    def metrics(self) -> Samples:
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_samples(body)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"tcpwatch serve exited: {self.log()}"
            try:
                if self.get("/-/ready")[0] == 200:
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout} s; log: {self.log()}")

    def polls(self) -> float:
        count = value(self.metrics(), "tcpwatch_poll_duration_seconds_count")
        assert count is not None
        return count

    def wait_for_polls(self, more_than: float, timeout: float = 20.0) -> Samples:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.metrics()
            count = value(samples, "tcpwatch_poll_duration_seconds_count") or 0
            if count > more_than:
                return samples
            time.sleep(0.2)
        raise AssertionError(f"no poll after #{more_than} within {timeout} s; log: {self.log()}")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared in the log: {self.log()}")

    def signal(self, number: signal.Signals) -> None:
        os.kill(self.process.pid, number)


def start_serve(
    ns: Netns, log_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> Served:
    # `ip netns exec` execs the command, so the Popen pid is tcpwatch's own: signals reach it
    # directly and its exit code is ours to read.
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ns.exec_argv(sys.executable, "-m", "tcpwatch", "serve", *args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**tcpwatch_env(), **(env or {})},
            cwd=str(REPO_ROOT),
        )
    return Served(ns, process, log_path)


@pytest.fixture
def serve(netns: Netns, tmp_path: Path) -> Iterator[StartServe]:
    """``serve(*args)`` starts tcpwatch serve in the test's namespace; killed after the test."""
    started: list[Served] = []

    def run(*args: str, env: Mapping[str, str] | None = None) -> Served:
        served = start_serve(netns, tmp_path / f"serve-{len(started)}.log", *args, env=env)
        started.append(served)
        return served

    yield run
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
        served.process.wait(timeout=10)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- numbers against ss and nstat ------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """What ss and nstat showed, unchanged, around one of the daemon's polls."""

    counts: Mapping[tuple[str, str], int]  # (family, state) -> sockets, as `ss -tanH -4/-6`
    counters: Mapping[str, int]  # `nstat -asz`


def ss_view(ns: Netns) -> tuple[tuple[object, ...], Window]:
    keys: list[tuple[object, ...]] = []
    counts: Counter[tuple[str, str]] = Counter()
    for family, flag in (("ipv4", "-4"), ("ipv6", "-6")):
        for sock in parse_ss(ns.ss("-tanH", flag)):
            keys.append((family, *sock.key))
            counts[(family, sock.state)] += 1
    counters = ns.nstat()
    watched = tuple(
        counters.get(name, 0) for name in ("TcpExtListenOverflows", "TcpExtListenDrops")
    )
    return (tuple(sorted(keys, key=repr)), watched), Window(dict(counts), counters)


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets a process holds, from its fd links (``socket:[12345]``)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            link = os.readlink(os.path.join(fd_dir, name))
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def quiet_poll(served: Served, interval: float, attempts: int = 8) -> tuple[Samples, Window]:
    """Metrics of a poll that ran wholly inside a window in which ss and nstat stood still.

    The daemon polls on its own; the window is: read ss, wait past a whole poll, read ss again,
    then scrape (so the scrape's own connection is not in the window). The scraped poll must
    have started after the first read and ended before the second.
    """
    problem = ""
    for _ in range(attempts):
        window_start = time.time()
        before, window = ss_view(served.ns)
        time.sleep(interval * 1.5 + 0.5)
        after, _ = ss_view(served.ns)
        window_end = time.time()
        samples = served.metrics()
        started = value(samples, "tcpwatch_last_poll_timestamp_seconds") or 0.0
        took = sum(matching(samples, "tcpwatch_source_duration_seconds").values())
        if before != after:
            problem = "sockets or counters moved"
        elif not window_start <= started <= started + took < window_end:
            problem = f"poll at {started} (+{took:.3f} s) outside [{window_start}, {window_end}]"
        else:
            return samples, window
    raise AssertionError(f"never a quiet poll in {attempts} tries: {problem}")


def test_scrape_matches_ss_and_history_escalates_close_wait(
    netns: Netns, serve: StartServe, tmp_path: Path
) -> None:
    populations.established(netns, pairs=40, port=20001)
    populations.established(netns, pairs=12, port=20002, address="::1")
    leaker = populations.close_wait(netns, count=16, port=20005, process_name="tw-leaker")
    full = populations.accept_queue_full(netns, port=20008, backlog=4, overflowing=3)
    config = write(
        tmp_path / "config.yaml",
        "collect:\n  attribute_states: [close_wait]\n"
        "rules:\n  S01: {warning: 5, stale_seconds: 10, critical: 5}\n",
    )
    served = serve("--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--config", config)
    served.wait_ready()
    netns_label = netns.name
    subject = "tw-leaker"  # the process name, never its pid
    first = matching(served.metrics(), "tcpwatch_finding", id="S01", subject=subject)
    first_s01 = [dict(labels)["severity"] for labels in first]

    samples, window = quiet_poll(served, interval=1.0)
    counts = window.counts
    for family in ("ipv4", "ipv6"):
        for state in populations.TCP_STATE_CODES:
            got = value(samples, "tcpwatch_sockets", netns=netns_label, family=family, state=state)
            assert got == counts.get((family, state), 0), (family, state, got, counts)
    assert counts[("ipv4", "established")] >= 80
    assert counts[("ipv6", "established")] == 24
    assert counts[("ipv4", "close_wait")] == 16

    # Owners from the kernel's own records (`ss -e` inodes, /proc/PID/fd) rather than `ss -p`,
    # which scans every process of the host and takes seconds.
    (listener,) = [s for s in parse_ss(netns.ss("-ltnHe")) if s.local_port == 20008]
    labels = {"netns": netns_label, "address": "127.0.0.1", "port": "20008", "socket": "0"}
    assert value(samples, "tcpwatch_listen_queue_length", **labels) == listener.recv_q == 5
    assert value(samples, "tcpwatch_listen_queue_max", **labels) == listener.send_q == 4
    ((owner_labels, _),) = matching(samples, "tcpwatch_listener_info", **labels).items()
    owner = dict(owner_labels)
    assert listener.inode in socket_inodes(full.info["pid"])
    assert (owner["process"], int(owner["pid"])) == (comm(full.info["pid"]), full.info["pid"])
    overflows = value(samples, "tcpwatch_listen_overflows_total", netns=netns_label)
    assert overflows == window.counters["TcpExtListenOverflows"] >= 1

    close_wait = {s.inode for s in parse_ss(netns.ss("-tanHe")) if s.state == "close_wait"}
    held = len(close_wait & socket_inodes(leaker.info["pid"]))
    assert held == 16
    assert comm(leaker.info["pid"]) == "tw-leaker"
    leaker_labels = {"netns": netns_label, "process": "tw-leaker", "state": "close_wait"}
    assert value(samples, "tcpwatch_process_sockets", **leaker_labels) == held

    # S01 fired at once (16 >= 5) as a warning; once the daemon has seen the same sockets in
    # CLOSE_WAIT for 10 s (its history across polls), it is critical.
    assert first_s01 == ["warning"]
    deadline = time.monotonic() + 30
    severity = "warning"
    while severity != "critical" and time.monotonic() < deadline:
        time.sleep(1)
        found = matching(served.metrics(), "tcpwatch_finding", id="S01", subject=subject)
        severity = next(dict(k)["severity"] for k in found)
    assert severity == "critical", served.log()

    status, page = served.get("/")
    assert status == 200
    assert "tcpwatch" in page and 'href="/metrics"' in page and subject in page
    assert served.get("/-/healthy") == (200, "Healthy\n")
    assert "Traceback" not in served.log()


def test_a_failing_source_degrades_only_its_metrics(
    netns: Netns, serve: StartServe, tmp_path: Path
) -> None:
    # A procfs whose /proc/net lacks netstat and snmp: the counters source fails every poll,
    # while sock_diag (netlink, no procfs) keeps working.
    fake = tmp_path / "proc"
    (fake / "net").mkdir(parents=True)
    for name in ("sockstat", "sockstat6"):
        (fake / "net" / name).write_text(netns.run("cat", f"/proc/net/{name}").stdout)
    config = write(tmp_path / "config.yaml", "collect:\n  established: dumped\n")
    served = serve(
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--procfs", str(fake),
        "--config", config,
    )  # fmt: skip
    served.wait_ready()
    samples = served.wait_for_polls(3)
    up = {dict(k)["source"]: v for k, v in matching(samples, "tcpwatch_source_up").items()}
    assert up["counters"] == 0
    assert up["sockdiag"] == 1
    (errors,) = matching(samples, "tcpwatch_source_errors_total", source="counters").values()
    assert errors >= 3
    assert not matching(samples, "tcpwatch_listen_overflows_total")  # its metrics are absent
    listening = matching(samples, "tcpwatch_sockets", family="ipv4", state="listen")
    assert list(listening.values()) == [1.0]  # tcpwatch's own listener, seen over netlink
    assert served.get("/-/healthy")[0] == 200
    log = served.log()
    assert log.count("source counters in netns") == 1, log  # rate-limited: one line, not one a poll

    for name in ("netstat", "snmp"):
        (fake / "net" / name).write_text(netns.run("cat", f"/proc/net/{name}").stdout)
    log = served.wait_for_log("source counters in netns")
    served.wait_for_log("recovered after")
    samples = served.wait_for_polls(served.polls())
    assert matching(samples, "tcpwatch_source_up", source="counters").popitem()[1] == 1
    assert "Traceback" not in served.log()


# -- reload and stop -------------------------------------------------------------------------------


def test_sighup_reloads_a_changed_config_and_keeps_it_over_a_broken_one(
    netns: Netns, serve: StartServe, tmp_path: Path
) -> None:
    populations.close_wait(netns, count=8, port=20005, process_name="tw-leaker")
    subject = "tw-leaker"  # the process name, never its pid
    path = tmp_path / "config.yaml"
    write(
        path,
        f'listen: "127.0.0.1:{PORT}"\ninterval: 1\nrules:\n  S01: {{warning: 5}}\n',
    )
    served = serve("--config", str(path))
    served.wait_ready()
    before = served.wait_for_polls(1)
    assert matching(before, "tcpwatch_finding", id="S01", subject=subject)
    assert matching(before, "tcpwatch_process_sockets", process="tw-leaker")

    # A changed config: S01 off, no per-process series, a one-hour interval, another port.
    write(
        path,
        f'listen: "127.0.0.1:{PORT + 1}"\ninterval: 3600\n'
        "collect:\n  top_processes: 0\nrules:\n  S01: false\n",
    )
    served.signal(signal.SIGHUP)
    served.wait_for_log("configuration reloaded from")
    # The reload polls at once with the new settings (the next regular poll is an hour away).
    deadline = time.monotonic() + 10
    after = served.metrics()
    while matching(after, "tcpwatch_finding", id="S01") and time.monotonic() < deadline:
        time.sleep(0.2)
        after = served.metrics()
    assert not matching(after, "tcpwatch_finding", id="S01")
    assert not matching(after, "tcpwatch_process_sockets")
    log = served.log()
    assert (
        f"listen changed from 127.0.0.1:{PORT} to 127.0.0.1:{PORT + 1}: that takes a restart" in log
    )
    reloaded_polls = value(after, "tcpwatch_poll_duration_seconds_count")
    time.sleep(2.5)  # on the old 1 s interval this would be two more polls
    assert served.polls() == reloaded_polls

    # A broken config: one error line naming the key, the running config stays.
    write(path, 'interval: "fast"\nrules:\n  S01: {warning: 5}\n')
    served.signal(signal.SIGHUP)
    log = served.wait_for_log("reload failed")
    # Every line the daemon wrote is logfmt a strict parser reads (node_exporter's format).
    records = [parse_logfmt(line) for line in log.splitlines()]
    assert records and all(list(r)[:3] == ["ts", "level", "msg"] for r in records), log
    failures = [r for r in records if "reload failed" in r["msg"]]
    assert [(f["level"], f["msg"]) for f in failures] == [
        (
            "error",
            "reload failed, still running the previous configuration: "
            f"{path}: interval: expected a number between 1 and 3600 seconds or a duration such "
            'as "15s", "1m", "100ms" or "1h30m", got "fast"',
        )
    ]
    assert served.process.poll() is None
    status, body = served.get("/metrics")
    assert status == 200
    samples = parse_samples(body)
    assert not matching(samples, "tcpwatch_finding", id="S01")  # still the reloaded config
    assert "Traceback" not in served.log()


def test_sighup_with_a_fifo_config_does_not_block_sigterm(
    netns: Netns, serve: StartServe, tmp_path: Path
) -> None:
    # Issue 12: with --config naming a FIFO, SIGHUP blocked the main thread in open(), so the
    # SIGTERM after it was never taken. Nobody writes to the FIFO here.
    path = tmp_path / "config.yaml"
    write(path, f'listen: "127.0.0.1:{PORT}"\ninterval: 1s\n')
    served = serve("--config", str(path))
    served.wait_ready()
    path.unlink()
    os.mkfifo(path)
    served.signal(signal.SIGHUP)
    log = served.wait_for_log("reload failed")
    assert (
        "reload failed, still running the previous configuration: "
        f"{path}: cannot read the configuration file: it is a FIFO (named pipe), not a file"
    ) in [parse_logfmt(line).get("msg") for line in log.splitlines() if line.startswith("ts=")]
    assert served.get("/-/healthy")[0] == 200
    began = time.monotonic()
    served.signal(signal.SIGTERM)
    assert served.process.wait(timeout=10) == 0, served.log()
    assert time.monotonic() - began < STOP_LIMIT
    assert "Traceback" not in served.log()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_0_within_2_seconds(
    netns: Netns, serve: StartServe, stop_signal: signal.Signals
) -> None:
    populations.established(netns, pairs=20, port=20001)
    # node_exporter's flag names, and JSON log lines.
    served = serve(
        "--web.listen-address", f"127.0.0.1:{PORT}", "--interval", "1", "--log.format", "json"
    )
    served.wait_ready()
    served.wait_for_polls(2)
    began = time.monotonic()
    served.signal(stop_signal)
    code = served.process.wait(timeout=10)
    took = time.monotonic() - began
    assert code == 0, served.log()
    assert took < STOP_LIMIT, f"stopped after {took:.2f} s"
    records = [json.loads(line) for line in served.log().splitlines()]
    assert records and all(list(r)[:3] == ["ts", "level", "msg"] for r in records), served.log()
    assert f"{stop_signal.name} received: stopping" in [r["msg"] for r in records]
    # What is bound, as node_exporter logs it (issue 22 item 6), not a URL guessed from it.
    listening = [r for r in records if r["msg"] == "Listening on"]
    assert [(r["address"], r["tls"]) for r in listening] == [(f"127.0.0.1:{PORT}", "false")]
    assert "Traceback" not in served.log()
    listeners = [s for s in parse_ss(netns.ss("-ltnH")) if s.local_port == PORT]
    assert listeners == []


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket (a path: unix paths cross namespaces)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = str(path)

    def receive(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        messages = []
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                messages.append(self.sock.recv(4096).decode())
        return messages

    def wait_for(self, prefix: str, timeout: float = READY_TIMEOUT) -> list[str]:
        """Messages up to and including the first that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                seen.append(self.sock.recv(4096).decode())
                if seen[-1].startswith(prefix):
                    return seen
        raise AssertionError(f"no {prefix!r} within {timeout} s; got {seen}")


def test_systemd_notifications_and_a_hung_poll(
    netns: Netns, serve: StartServe, tmp_path: Path
) -> None:
    # A procfs copy whose net/netstat becomes a FIFO mid-run: reading it blocks, as a hung
    # /proc read or netlink dump would, while the HTTP side goes on serving.
    fake = tmp_path / "proc"
    (fake / "net").mkdir(parents=True)
    for name in ("sockstat", "sockstat6", "netstat", "snmp"):
        (fake / "net" / name).write_text(netns.run("cat", f"/proc/net/{name}").stdout)
    notify = NotifySocket(tmp_path / "notify")
    try:
        served = serve(
            "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--procfs", str(fake),
            env={
                "NOTIFY_SOCKET": notify.path,
                "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
                "WATCHDOG_PID": "",  # tcpwatch's own pid is not known before it starts
            },
        )  # fmt: skip
        ready = notify.wait_for("READY=1")[-1]
        assert ready.startswith("READY=1\nSTATUS=polling every 1s; ")
        pings = notify.receive(1.0).count("WATCHDOG=1")
        assert pings >= 3, pings

        served.signal(signal.SIGHUP)
        reload = notify.wait_for("RELOADING=1", timeout=10)[-1]
        assert "\nMONOTONIC_USEC=" in reload
        assert notify.wait_for("READY=1", timeout=10)[-1].startswith("READY=1")

        netstat = fake / "net" / "netstat"
        netstat.unlink()
        os.mkfifo(netstat)
        time.sleep(1.5)  # the next poll starts within a second and blocks on the FIFO
        notify.receive(0.3)  # a ping sent just before may still be queued
        assert notify.receive(1.5).count("WATCHDOG=1") == 0  # systemd would restart us now
        assert served.get("/-/healthy")[0] == 200  # (503 only after STALLED_POLL_SECONDS)
        assert served.get("/metrics")[0] == 200  # scrapes still get the last poll

        began = time.monotonic()
        served.signal(signal.SIGTERM)
        code = served.process.wait(timeout=10)
        assert time.monotonic() - began < STOP_LIMIT
        assert code == 0, served.log()
        assert any(m.startswith("STOPPING=1") for m in notify.receive(0.5))
        assert "a poll was still running at shutdown" in served.log()
    finally:
        notify.sock.close()


# -- startup errors --------------------------------------------------------------------------------


def expect_one_line_exit_3(ns: Netns, *args: str) -> str:
    started = time.monotonic()
    result = run_tcpwatch(ns, "serve", *args, timeout=30)
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tcpwatch: ")
    assert time.monotonic() - started < 20
    return lines[0]


def test_port_taken_by_another_tcpwatch(netns: Netns, serve: StartServe) -> None:
    served = serve("--listen", f"127.0.0.1:{PORT}", "--interval", "1")
    served.wait_ready()
    line = expect_one_line_exit_3(netns, "--listen", f"127.0.0.1:{PORT}")
    assert line == (
        f"tcpwatch: cannot listen on 127.0.0.1:{PORT}: the port is already in use (another "
        "tcpwatch or exporter running?)"
    )
    assert served.process.poll() is None  # the first one goes on


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (
            "192.0.2.1:9477",
            "tcpwatch: cannot listen on 192.0.2.1:9477: no interface of this host has that address",
        ),
        (
            "127.0.0.1:99999",
            'tcpwatch: listen address "127.0.0.1:99999": port must be a number 0-65535, got '
            '"99999"',
        ),
        (
            "nonsense",
            'tcpwatch: listen address "nonsense": expected [ADDRESS]:PORT, e.g. ":9477", '
            '"127.0.0.1:9477" or "[::1]:9477"',
        ),
        (":²", 'tcpwatch: listen address ":²": port must be a number 0-65535, got "²"'),
        (":٣", 'tcpwatch: listen address ":٣": port must be a number 0-65535, got "٣"'),
        (
            "a..b:9477",
            'tcpwatch: listen address "a..b:9477": a host name has an empty label (two dots in a '
            "row, or a leading dot)",
        ),
    ],
)
def test_bad_listen_address(netns: Netns, listen: str, expected: str) -> None:
    assert expect_one_line_exit_3(netns, "--listen", listen) == expected


def test_config_problems(netns: Netns, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert expect_one_line_exit_3(netns, "--config", str(missing)) == (
        f"tcpwatch: {missing}: cannot read the configuration file: No such file or directory"
    )
    malformed = write(tmp_path / "malformed.yaml", "interval: 15\nrules: [\n")
    assert expect_one_line_exit_3(netns, "--config", malformed).startswith(
        f"tcpwatch: {malformed}: line 3: not valid YAML: "
    )
    invalid = write(tmp_path / "invalid.yaml", "interval: fast\n")
    assert expect_one_line_exit_3(netns, "--config", invalid) == (
        f"tcpwatch: {invalid}: interval: expected a number between 1 and 3600 seconds or a "
        'duration such as "15s", "1m", "100ms" or "1h30m", got "fast"'
    )
    assert expect_one_line_exit_3(netns, "--config", "/dev/zero") == (
        "tcpwatch: /dev/zero: cannot read the configuration file: it is a device, not a file"
    )
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert expect_one_line_exit_3(netns, "--config", str(fifo)) == (
        f"tcpwatch: {fifo}: cannot read the configuration file: it is a FIFO (named pipe), not a "
        "file"
    )
    bomb = write(
        tmp_path / "bomb.yaml",
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(
            f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n"
            for p, n in zip("abcdefg", "bcdefgh", strict=True)
        ),
    )
    assert expect_one_line_exit_3(netns, "--config", bomb) == (
        f"tcpwatch: {bomb}: line 2: aliases (*name) are not allowed in tcpwatch's configuration: "
        "write the value out in full"
    )
    web_bomb = tmp_path / "web-bomb.yml"
    web_bomb.write_text(Path(bomb).read_text())
    assert expect_one_line_exit_3(
        netns, "--listen", f"127.0.0.1:{PORT}", "--web-config", str(web_bomb)
    ).startswith(f"tcpwatch: {web_bomb}: line 2: aliases (*name) are not allowed")
    web = write(tmp_path / "web.yml", "tls_server_config:\n  cert_file: nowhere.crt\n")
    assert expect_one_line_exit_3(netns, "--listen", f"127.0.0.1:{PORT}", "--web-config", web) == (
        f"tcpwatch: {web}: tls_server_config.key_file: missing: TLS needs key_file (or inline key)"
    )


def test_unreadable_procfs(netns: Netns, tmp_path: Path) -> None:
    empty = tmp_path / "not-proc"
    empty.mkdir()
    assert expect_one_line_exit_3(netns, "--procfs", str(empty)) == (
        f"tcpwatch: {empty} does not look like a procfs mount (no net/sockstat): pass "
        "--path.procfs pointing at a mounted /proc"
    )


# -- status that tells the truth (issue 12, item 8) ---------------------------------------------


@pytest.mark.parametrize("selection", ["self", "pattern"])
def test_status_tells_the_truth_when_procfs_misbehaves(
    netns: Netns, serve: StartServe, tmp_path: Path, selection: str
) -> None:
    # A procfs stand-in the test can break: net/ copied from the namespace, sys/net/ written
    # here, self -> /proc/self (what names the namespace). "pattern" polls through discovery
    # (--netns NAME), which fails whole while /proc/self is unreadable.
    fake = tmp_path / "proc"
    (fake / "net").mkdir(parents=True)
    for name in ("sockstat", "sockstat6", "netstat", "snmp"):
        (fake / "net" / name).write_text(netns.run("cat", f"/proc/net/{name}").stdout)
    sysctls = {
        "core/somaxconn": "4096\n",
        "ipv4/tcp_syncookies": "1\n",
        "ipv4/tcp_mem": "287898\t383866\t575796\n",
        "ipv4/ip_local_port_range": "32768\t60999\n",
    }
    for name, text in sysctls.items():
        (fake / "sys" / "net" / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / "sys" / "net" / name).write_text(text)
    (fake / "self").symlink_to("/proc/self")
    netns_flag = netns.name if selection == "pattern" else "self"
    served = serve(
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--procfs", str(fake),
        "--netns", netns_flag,
    )  # fmt: skip
    served.wait_ready()
    samples = served.wait_for_polls(1)
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="sysctl") == 1
    assert value(samples, "tcpwatch_source_degraded", netns=netns.name, source="sysctl") == 0
    assert len(matching(samples, "tcpwatch_sysctl")) == 7  # tcp_mem and the range per field

    # (a) A malformed file drops its own series only, and the source says it is degraded.
    (fake / "sys" / "net" / "ipv4" / "tcp_mem").write_text("287898 383866\n")
    (fake / "sys" / "net" / "ipv4" / "ip_local_port_range").write_text("1\t4000000000\n")
    samples = served.wait_for_polls(served.polls())
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="sysctl") == 1
    assert value(samples, "tcpwatch_source_degraded", netns=netns.name, source="sysctl") == 2
    names = {dict(key)["name"] for key in matching(samples, "tcpwatch_sysctl")}
    assert names == {"net.core.somaxconn", "net.ipv4.tcp_syncookies"}
    assert not matching(samples, "tcpwatch_ephemeral_port_range_size")

    # (b) The sysctl tree gone: the source read nothing, so it is down, not up and empty.
    shutil.rmtree(fake / "sys")
    samples = served.wait_for_polls(served.polls())
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="sysctl") == 0
    assert not matching(samples, "tcpwatch_sysctl")
    assert value(samples, "tcpwatch_source_up", netns=netns.name, source="sockdiag") == 1

    # (c) /proc/self unreadable: the namespace keeps its name, no series moves to "unknown".
    (fake / "self").unlink()
    samples = served.wait_for_polls(served.polls() + 1)
    labels = {dict(key).get("netns") for (_, key) in samples} - {None}
    assert labels == {netns.name}, labels

    assert "Traceback" not in served.log()
