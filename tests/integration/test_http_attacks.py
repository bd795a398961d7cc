"""A real `tcpwatch serve` under the attacks of issue 12, in a throw-away namespace.

Each test starts serve in its namespace, attacks it from there (tests/integration/http_attack.py)
and scrapes it while the attack runs, from a separate process, with a fresh connection per
scrape. The bar is the issue's: every correct scrape served, p99 under 1 s (a scraper's first
password check during a flood waits its turn, see the flood test). The scale fits a 2-core CI
machine in seconds; the numbers seen are printed for docs/performance.md. Issue 21's attacks
are in test_http_attacks_hostile.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import bcrypt
import pytest

from .netns import REPO_ROOT, Netns, tcpwatch_env
from .test_serve import Served, matching, write

pytestmark = pytest.mark.integration

PORT = 19478
HELPER = str(Path(__file__).with_name("http_attack.py"))
PASSWORD = "scrape-secret"
SCRAPES = 40
P99_LIMIT = 1.0


@pytest.fixture
def started(netns: Netns, tmp_path: Path) -> Iterator[list[Served]]:
    servers: list[Served] = []
    yield servers
    for served in servers:
        if served.process.poll() is None:
            served.process.kill()
        served.process.wait(timeout=10)


def start(
    ns: Netns, servers: list[Served], log: Path, *args: str, nofile: int | None = None
) -> Served:
    """serve in ``ns``; with ``nofile``, under that descriptor limit (this process only)."""
    limit: Sequence[str] = ("prlimit", f"--nofile={nofile}:{nofile}") if nofile else ()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ns.exec_argv(*limit, sys.executable, "-m", "tcpwatch", "serve", *args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tcpwatch_env(),
            cwd=str(REPO_ROOT),
        )
    served = Served(ns, process, log, port=PORT)
    servers.append(served)
    served.wait_for_log("first poll done", timeout=30)  # /-/ready may need credentials
    return served


def scrapes(
    ns: Netns, *auth: str, tls: bool = False, timeout: float = 10.0
) -> list[tuple[int, float]]:
    argv = [sys.executable, HELPER, "scrape", str(PORT), str(SCRAPES), "0.1", *auth]
    argv += [*(["--tls"] if tls else []), f"--timeout={timeout:g}"]
    result = ns.run(*argv, timeout=SCRAPES * (timeout + 1) + 30)
    return [(int(status), float(took)) for status, took in json.loads(result.stdout)]


def check_seconds(cost: int) -> float:
    """What one bcrypt check of this cost takes on this machine now (the median of three)."""
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(cost))
    took = []
    for _ in range(3):
        started = time.perf_counter()
        bcrypt.checkpw(b"y", hashed)
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def p99(results: list[tuple[int, float]]) -> float:
    took = sorted(seconds for _, seconds in results)
    return took[min(len(took) - 1, int(len(took) * 0.99))]


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_wrong_password_flood_leaves_scrapes_served(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()  # ~60-130 ms a check
    web = write(tmp_path / "web.yml", f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    served = start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--web-config", web,
    )  # fmt: skip
    pid = served.process.pid
    attack = netns.spawn(
        [sys.executable, HELPER, "flood", str(PORT), "64", "15", "prometheus"], lifetime=60
    )
    assert netns.read_line(attack, timeout=20) == "started"
    cpu_before, clock_before = cpu_seconds(pid), time.monotonic()
    time.sleep(1.0)  # the flood in full swing before the first scrape
    one_check = check_seconds(10)
    results = scrapes(netns, "prometheus", PASSWORD, timeout=60)
    busy = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - clock_before)
    threads = proc_status(pid, "Threads")
    seen = json.loads(netns.read_line(attack, timeout=40))
    first, rest = results[0], results[1:]
    print(
        f"\nwrong-password flood, 64 clients: {seen}; first scrape {first[1]:.2f} s (a check "
        f"takes {one_check:.3f} s), then p99 {p99(rest):.3f} s; {busy:.0%} of a core"
    )
    assert [status for status, _ in results] == [200] * SCRAPES, results
    # The scraper's first check waits its turn behind the checks that came before it (one per
    # flooding connection, the flood's first round: nothing tells them apart before bcrypt has
    # spoken), never behind those that come after; from then on it is trusted and goes first.
    assert first[1] < (64 + 2) * one_check * 2 + 1, (first, one_check)
    assert p99(rest) < P99_LIMIT, rest
    # Each attacker waited for its answer: checked (401) at bcrypt's pace, one check at a time,
    # or still waiting when its client gave up after 5 s; none was turned away unchecked.
    assert seen.get("401", 0) > 30 and set(seen) <= {"401", "TimeoutError"}, seen
    assert busy < 1.5, busy
    assert threads <= 20, threads  # no thread per attacker


def test_slow_header_connections_against_a_low_descriptor_limit(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    served = start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", nofile=1024,
    )  # fmt: skip
    assert "descriptor limit 1024: up to 512 HTTP connections" in served.log()
    pid = served.process.pid
    attack = netns.spawn(
        [sys.executable, HELPER, "slow", str(PORT), "1100", "14", "1"], lifetime=60
    )
    assert netns.read_line(attack, timeout=40) == "started"
    cpu_before, clock_before = cpu_seconds(pid), time.monotonic()
    polls_before = served.polls()
    results = scrapes(netns)
    open_fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    threads = proc_status(pid, "Threads")
    busy = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - clock_before)
    seen = json.loads(netns.read_line(attack, timeout=40))
    samples = served.wait_for_polls(polls_before + 2)
    print(
        f"\n1,100 slow-header connections, RLIMIT_NOFILE 1024: {seen}; scrape p99 "
        f"{p99(results):.3f} s; {open_fds} fds, {threads} threads, {busy:.0%} of a core"
    )
    assert [status for status, _ in results] == [200] * SCRAPES, results
    assert p99(results) < P99_LIMIT, results
    assert open_fds <= 512 + 64, open_fds  # the cap, plus the daemon's own descriptors
    assert threads <= 20, threads
    assert busy < 0.8, busy  # the accept loop does not spin
    assert seen["reopened"] > 0  # slow connections were dropped (deadline, or shed at the cap)
    # The sources kept their descriptors through it all: every one read. (Not sysctl: in a
    # fresh namespace it fails on ip_local_reserved_ports, whatever the HTTP side does.)
    for source in ("sockstat", "counters", "sockdiag"):
        ups = matching(samples, "tcpwatch_source_up", source=source)
        assert ups and set(ups.values()) == {1.0}, (source, ups)
    assert "Traceback" not in served.log()


def test_too_low_a_descriptor_limit_is_one_line_and_exit_3(netns: Netns) -> None:
    result = subprocess.run(
        netns.exec_argv(
            "prlimit", "--nofile=200:200",
            sys.executable, "-m", "tcpwatch", "serve", "--listen", f"127.0.0.1:{PORT}",
        ),
        capture_output=True, text=True, timeout=30, env=tcpwatch_env(), cwd=str(REPO_ROOT),
    )  # fmt: skip
    assert result.returncode == 3, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("tcpwatch: the descriptor limit (RLIMIT_NOFILE) is 200:")
    assert "LimitNOFILE=" in lines[0]


def test_plain_http_to_the_tls_port_gets_400(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    web = write(
        tmp_path / "web.yml",
        f"tls_server_config:\n  cert_file: {tmp_path}/c.pem\n  key_file: {tmp_path}/k.pem\n",
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            netns.exec_argv(
                sys.executable, "-m", "tcpwatch", "serve",
                "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--web-config", web,
            ),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=tcpwatch_env(), cwd=str(REPO_ROOT),
        )  # fmt: skip
    started.append(Served(netns, process, log, port=PORT))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "serving" not in log.read_text():
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)
    status, body = started[-1].get("/metrics")  # plain HTTP
    assert (status, body) == (400, "Client sent an HTTP request to an HTTPS server.\n")
    assert [status for status, _ in scrapes(netns, tls=True)[:3]] == [200, 200, 200]


def test_unknown_users_take_as_long_as_known_ones(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    # A cost-12 user, issue 12's case: against a fixed cost-10 dummy, unknown users answered 4x
    # faster. Every attempt here fails from one address, and failures from an address are served
    # after clean ones, so the users take turns for any drift to fall on both alike.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    web = write(tmp_path / "web.yml", f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--web-config", web,
    )  # fmt: skip

    def timed(user: str) -> list[float]:
        argv = [sys.executable, HELPER, "scrape", str(PORT), "2", "0", user, "wrong"]
        results = json.loads(netns.run(*argv, timeout=60).stdout)
        assert [status for status, _ in results] == [401, 401], results
        return [took for _, took in results]

    known: list[float] = []
    unknown: list[float] = []
    for _ in range(2):
        known += timed("prometheus")
        unknown += timed("mallory")
    known_median, unknown_median = statistics.median(known), statistics.median(unknown)
    assert 0.6 < unknown_median / known_median < 1.7, (known, unknown)
