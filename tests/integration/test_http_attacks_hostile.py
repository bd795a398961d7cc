"""Issue 21 ("hostile input, round 2") and issue 16's flood from the scraper's own address,
against a real `tcpwatch serve` in a throw-away namespace.

Each test reproduces one finding with the attack that found it (tests/integration/http_attack.py,
run inside the namespace), bounded in count and time, and checks that correct scrapes are
served meanwhile and after. The figures seen are printed for docs/performance.md.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from ..pki import Pki, make_pki
from .netns import Netns
from .test_http_attacks import (
    HELPER,
    P99_LIMIT,
    PASSWORD,
    PORT,
    check_seconds,
    p99,
    proc_status,
    scrapes,
    start,
    started,
)
from .test_serve import Served, write

pytestmark = pytest.mark.integration

__all__ = ["started"]  # the fixture, used by name

NODE_EXPORTER = "prometheus-node-exporter"
NODE_PORT = 19100


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Pki, tmp_path: Path, extra: str = "") -> str:
    return write(
        tmp_path / "web.yml",
        f"tls_server_config:\n  cert_file: {pki['server.crt']}\n  key_file: {pki['server.key']}\n"
        + extra,
    )


def rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def clean_log(served: Served) -> None:
    """No thread died, no traceback, nothing at level error."""
    log = served.log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-3000:]
    assert "level=error" not in log, log[-3000:]


# -- item 1: a reset at any stage of a connection --------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_resets_at_every_stage_leave_the_server_serving(
    netns: Netns, tmp_path: Path, started: list[Served], pki: Pki, tls: bool
) -> None:
    args = ["--web-config", tls_config(pki, tmp_path)] if tls else []
    served = start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", *args,
    )  # fmt: skip
    argv = [sys.executable, HELPER, "resets", str(PORT), "20", *(["--tls"] if tls else [])]
    seen = json.loads(netns.run(*argv, timeout=240).stdout)
    print(f"\nresets ({'TLS' if tls else 'plain'}), 20 per stage: {seen}")
    assert set(seen) == {"connect", "client-hello", "handshake", "head", "body", "response", "idle"}
    # Each stage was reached before the reset (the server answered the idle one first, and
    # wrote to the reader that reset mid-response).
    assert seen["idle"].get("reset", 0) == 20, seen
    assert seen["response"].get("reset", 0) == 20, seen
    results = scrapes(netns, tls=tls)
    assert [status for status, _ in results] == [200] * len(results), results
    assert served.process.poll() is None
    clean_log(served)


# -- item 3: readers that never read ---------------------------------------------------------------


def test_readers_that_never_read_leave_scrapes_served(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    # The attack: 80 connections every 10 s, each with a 1-byte receive buffer and
    # ~30 KB of pipelined GET /metrics, never reading; here every 5 s, three times.
    served = start(
        netns, started, tmp_path / "serve.log", "--listen", f"127.0.0.1:{PORT}", "--interval", "1"
    )
    attack = netns.spawn([sys.executable, HELPER, "slowread", str(PORT), "80", "3", "5"], 90)
    assert netns.read_line(attack, timeout=30) == "started"
    time.sleep(0.5)
    results = scrapes(netns)
    threads = proc_status(served.process.pid, "Threads")
    seen = json.loads(netns.read_line(attack, timeout=60))
    print(f"\nslow readers, 80 every 5 s: {seen}; scrape p99 {p99(results):.3f} s")
    assert seen["sent"] >= 200, seen
    assert [status for status, _ in results] == [200] * len(results), results
    # Before: 7 scrapes in 8 failed (503, or a timeout after 10 s) and the rest took 7.6-8.7 s.
    # Now a burst of 80 requests at once is rendered in turn (without auth nothing puts the
    # scraper ahead of them): well under a second on an idle machine, more on a loaded one.
    assert p99(results) < 3 * P99_LIMIT, results
    assert threads <= 20, threads
    clean_log(served)


# -- item 4: held answered connections and a connect/close flood ---------------------------------


def test_held_connections_and_a_connect_flood_leave_room_for_new_clients(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    served = start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", nofile=1024,
    )  # fmt: skip
    assert "up to 512 HTTP connections" in served.log()
    holder = netns.spawn([sys.executable, HELPER, "hold", str(PORT), "511", "60"], lifetime=90)
    held = netns.read_line(holder, timeout=60)
    assert held == "held 511", held
    flood = netns.spawn([sys.executable, HELPER, "connflood", str(PORT), "3", "20"], 60)
    assert netns.read_line(flood, timeout=30) == "started"
    time.sleep(1.0)
    # Each probe's request follows its connection by 0.2 s, as a client far away or busy does.
    argv = [sys.executable, HELPER, "scrape", str(PORT), "9", "0.5", "--timeout=10", "--delay=0.2"]
    probes = [(int(s), float(t)) for s, t in json.loads(netns.run(*argv, timeout=120).stdout)]
    rate = json.loads(netns.read_line(flood, timeout=60))
    print(f"\n511 held connections + connect/close flood {rate}; probes {probes}")
    assert [status for status, _ in probes] == [200] * 9, probes
    assert rate["per_second"] > 300, rate  # a flood, not a trickle
    clean_log(served)


# -- item 5: a reload that turns TLS and client certificates on ------------------------------------


def test_a_reload_requiring_tls_closes_kept_alive_plaintext_connections(
    netns: Netns, tmp_path: Path, started: list[Served], pki: Pki
) -> None:
    web = tmp_path / "web.yml"
    web.write_text("")  # plain HTTP, no auth
    served = start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--web-config", str(web),
    )  # fmt: skip
    marker = tmp_path / "reloaded"
    client = netns.spawn([sys.executable, HELPER, "keepalive", str(PORT), str(marker)], 90)
    assert netns.read_line(client, timeout=30) == "first 200"
    tls_config(
        pki, tmp_path,
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki['ca.crt']}\n",
    )  # fmt: skip
    served.signal(signal.SIGHUP)
    served.wait_for_log("TLS (client certificates)", timeout=20)
    marker.touch()
    second = netns.read_line(client, timeout=30)
    print(f"\nthe kept-alive plaintext connection after the reload: {second}")
    assert second.split()[1] in ("RemoteDisconnected", "ConnectionResetError", "BrokenPipeError")
    # New connections: TLS with a client certificate only.
    script = (
        "import http.client, ssl, sys\n"
        f"c = ssl.create_default_context(cafile='{pki['ca.crt']}')\n"
        "if sys.argv[1]: c.load_cert_chain(sys.argv[1] + '.crt', sys.argv[1] + '.key')\n"
        f"h = http.client.HTTPSConnection('localhost', {PORT}, context=c, timeout=10)\n"
        "try:\n    h.request('GET', '/-/healthy'); print(h.getresponse().status)\n"
        "except (OSError, ssl.SSLError) as e: print(type(e).__name__)\n"
    )
    with_cert = netns.run(sys.executable, "-c", script, str(pki.directory / "prometheus"))
    without = netns.run(sys.executable, "-c", script, "")
    assert with_cert.stdout.strip() == "200", with_cert
    assert without.stdout.strip() != "200", without
    clean_log(served)


# -- item 6: a flood from many addresses, and a reload during it -----------------------------------


def test_a_rotating_address_flood_and_a_reload_leave_scrapers_served(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    web = write(
        tmp_path / "web.yml",
        f"basic_auth_users:\n  prometheus: '{hashed}'\n  grafana: '{hashed}'\n",
    )
    served = start(
        netns, started, tmp_path / "serve.log",
        "--listen", f"127.0.0.1:{PORT}", "--interval", "1", "--web-config", web,
    )  # fmt: skip
    before = scrapes(netns, "prometheus", PASSWORD)[:1]  # verified before the flood
    assert before[0][0] == 200, before
    flood = [sys.executable, HELPER, "flood", str(PORT), "16", "20", "prometheus"]
    attack = netns.spawn([*flood, "--addresses=rotate:16000"], lifetime=60)
    assert netns.read_line(attack, timeout=30) == "started"
    time.sleep(1.0)
    argv = [sys.executable, HELPER, "scrape", str(PORT), "1", "0.1", "prometheus", PASSWORD]
    verified = subprocess.Popen(
        netns.exec_argv(*argv, "--seconds=12"), stdout=subprocess.PIPE, text=True
    )
    time.sleep(3.0)
    served.signal(signal.SIGHUP)  # a no-op reload in the middle of it
    one_check = check_seconds(10)
    unverified = scrapes(netns, "grafana", PASSWORD, timeout=60)[:3]
    out, _ = verified.communicate(timeout=60)
    results = [(int(status), float(took)) for status, took in json.loads(out)]
    seen = json.loads(netns.read_line(attack, timeout=60))
    print(
        f"\nrotating flood, 16 threads over 16,000 addresses: {seen}; verified scraper: "
        f"{len(results)} scrapes, p99 {p99(results):.3f} s; a new user's first scrape "
        f"{unverified[0][1]:.2f} s (a check {one_check:.3f} s)"
    )
    assert served.wait_for_log("configuration reloaded")
    # Never a 429 or 503 for a client that did nothing wrong: not from the flood, not from the
    # reload (the verified cache outlives it), not from busy checks counted as its failures.
    assert [status for status, _ in results] == [200] * len(results), results
    assert p99(results) < P99_LIMIT, results
    assert [status for status, _ in unverified] == [200] * 3, unverified
    assert unverified[0][1] < (16 + 2) * one_check * 2 + 1, (unverified, one_check)
    assert seen.get("401", 0) > 20, seen
    clean_log(served)


# -- items 9 and 10: the render cache -------------------------------------------------------------


@pytest.fixture
def listeners(netns: Netns) -> Iterator[None]:
    """5,000 listening sockets in the namespace: a 2 MB exposition, as in the issue."""
    script = (
        "import socket, sys, time\n"
        "held = []\n"
        "for port in range(20000, 25000):\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', port)); s.listen(1); held.append(s)\n"
        "print('listening', flush=True); time.sleep(600)\n"
    )
    helper = netns.spawn(
        ["prlimit", "--nofile=8192:8192", sys.executable, "-c", script], lifetime=600
    )
    assert netns.read_line(helper, timeout=60) == "listening"
    yield
    netns.stop(helper)


def test_the_render_cache_holds_under_versions_name_filters_and_gzip(
    netns: Netns, tmp_path: Path, started: list[Served], listeners: None
) -> None:
    served = start(
        netns, started, tmp_path / "serve.log", "--listen", f"127.0.0.1:{PORT}", "--interval", "5"
    )
    pid = served.process.pid
    size = len(served.get("/metrics")[1])
    assert size > 1_500_000, size
    baseline = rss_kib(pid)
    rss: dict[str, int] = {}
    for kind in ("versions", "names", "gzip"):
        load = netns.spawn([sys.executable, HELPER, "load", str(PORT), "8", "12", kind], 90)
        assert netns.read_line(load, timeout=30) == "started"
        time.sleep(1.0)
        results = scrapes(netns)
        seen = json.loads(netns.read_line(load, timeout=90))
        rss[kind] = rss_kib(pid)
        print(f"\n{kind}: {seen}; scrape p99 {p99(results):.3f} s; RSS {rss[kind] // 1024} MiB")
        assert [status for status, _ in results] == [200] * len(results), (kind, results)
        assert set(seen) == {"200"}, (kind, seen)  # "version=2.x" is served, never a 500
        # From the cached bytes, a request costs little: rendered afresh each (as before), 8
        # connections got a few hundred answers in 12 s and held scrapes up for seconds.
        assert seen["200"] > 1000, (kind, seen)
    status, _ = served.get("/metrics")  # and still whole afterwards
    assert status == 200
    print(f"RSS before {baseline // 1024} MiB, after each load {rss}; exposition {size} bytes")
    # Each format's bytes once per poll (2.5 MB each here; the exposition also keeps the last
    # rendering of the state before, for the families that did not change), not one copy per
    # version or request: that would be GBs over these thousands of requests. Growth measured
    # 31-42 MiB with glibc's per-thread arenas (42 once in CI, against a bound of 40 then).
    assert max(rss.values()) - baseline < 64 * 1024, (baseline, rss)
    clean_log(served)


def test_an_unknown_openmetrics_version_is_served_without_an_error(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    served = start(
        netns, started, tmp_path / "serve.log", "--listen", f"127.0.0.1:{PORT}", "--interval", "1"
    )
    script = (
        "import http.client, sys\n"
        f"h = http.client.HTTPConnection('127.0.0.1', {PORT}, timeout=10)\n"
        "for version in ('abc', '2.x', '', '1.0'):\n"
        "    accept = 'application/openmetrics-text; version=' + version\n"
        "    h.request('GET', '/metrics', headers={'Accept': accept})\n"
        "    r = h.getresponse(); r.read(); print(r.status, r.getheader('Content-Type'))\n"
    )
    lines = netns.run(sys.executable, "-c", script).stdout.splitlines()
    assert lines == [
        "200 text/plain; version=0.0.4; charset=utf-8",
        "200 text/plain; version=0.0.4; charset=utf-8",
        "200 application/openmetrics-text; version=1.0.0; charset=utf-8",
        "200 text/plain; version=0.0.4; charset=utf-8",
    ], lines
    clean_log(served)


# -- issue 16 item 2: a flood from the scraper's own address, beside node_exporter ---------------


def test_correct_credentials_get_through_a_flood_from_their_own_address(
    netns: Netns, tmp_path: Path, started: list[Served]
) -> None:
    # 100 clients flood wrong passwords for the scraper's own user from the scraper's own
    # address (one NAT) for 20 s, with bcrypt cost 10; tcpwatch starts during the flood, so
    # nothing was verified before. The same flood against node_exporter, same web config.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    web = write(tmp_path / "web.yml", f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    outcomes: dict[str, list[tuple[int, float]]] = {}
    for name, port in (("node_exporter", NODE_PORT), ("tcpwatch", PORT)):
        if name == "tcpwatch":
            served = start(
                netns, started, tmp_path / "serve.log",
                "--listen", f"127.0.0.1:{PORT}", "--interval", "5", "--web-config", web,
            )  # fmt: skip
        else:
            node = netns.spawn(
                [
                    NODE_EXPORTER, "--collector.disable-defaults", "--collector.loadavg",
                    f"--web.listen-address=127.0.0.1:{NODE_PORT}", f"--web.config.file={web}",
                ],
                lifetime=120,
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while f":{NODE_PORT} " not in netns.ss("-tlnH") and time.monotonic() < deadline:
                assert node.poll() is None, netns.stderr_of(node)
                time.sleep(0.2)
        flood = [sys.executable, HELPER, "flood", str(port), "100", "20", "prometheus"]
        attack = netns.spawn([*flood, "--addresses=same"], lifetime=90)
        assert netns.read_line(attack, timeout=30) == "started"
        argv = [sys.executable, HELPER, "scrape", str(port), "1", "0.5", "prometheus", PASSWORD]
        result = netns.run(*argv, "--seconds=18", "--timeout=10", timeout=90)
        outcomes[name] = [(int(status), float(took)) for status, took in json.loads(result.stdout)]
        seen = json.loads(netns.read_line(attack, timeout=60))
        served_count = sum(1 for status, _ in outcomes[name] if status == 200)
        print(
            f"\n{name} under 100 clients on the scraper's address: {seen}; "
            f"{served_count} of {len(outcomes[name])} correct scrapes served: {outcomes[name]}"
        )
        if name == "node_exporter":
            netns.stop(node)
    tcpwatch = outcomes["tcpwatch"]
    # The first correct password is checked within a scrape timeout (its client's 10 s) ...
    assert tcpwatch[0][0] == 200, tcpwatch
    # ... and every scrape after it is served at once from the verified cache.
    assert [status for status, _ in tcpwatch] == [200] * len(tcpwatch), tcpwatch
    assert p99(tcpwatch[1:]) < P99_LIMIT, tcpwatch
    node_served = sum(1 for status, _ in outcomes["node_exporter"] if status == 200)
    assert len(tcpwatch) >= node_served, outcomes
    clean_log(served)
