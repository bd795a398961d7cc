"""The HTTP layer under hostile load (issue 12): password floods, slow clients, timing, limits.

In-process: the auth guards on their own, and the real server on a loopback port. The same
attacks against a real `tcpwatch serve` in a namespace: tests/integration/test_http_attacks.py.
"""

from __future__ import annotations

import base64
import http.client
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import bcrypt
import pytest

from tcpwatch.errors import UsageError
from tcpwatch.http import auth as http_auth
from tcpwatch.http import limits
from tcpwatch.http.auth import AuthResult, BasicAuth, BcryptGate, FailureLimiter, client_key
from tcpwatch.http.connection import ProtocolError, parse_head
from tcpwatch.http.limits import DescriptorBudget, descriptor_budget
from tcpwatch.http.listen import ListenAddress
from tcpwatch.http.server import WebServer
from tcpwatch.http.webconfig import WebConfig

from .test_web import Holder, export_state

PASSWORD = b"correct horse"


def basic(user: str, password: bytes) -> str:
    return "Basic " + base64.b64encode(user.encode() + b":" + password).decode()


# -- failed attempts per client address ------------------------------------------------------------


def test_failures_are_budgeted_per_address_and_refill() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=3, refill_seconds=10.0, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.allows("192.0.2.1")
        limiter.record_failure("192.0.2.1")
    assert not limiter.allows("192.0.2.1")
    assert limiter.failures("192.0.2.1") == 3
    assert limiter.allows("192.0.2.2") and limiter.failures("192.0.2.2") == 0
    now[0] = 10.0
    assert limiter.allows("192.0.2.1")


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    limiter = FailureLimiter(burst=1, refill_seconds=60.0)
    limiter.record_failure("2001:db8:1:2::1")
    assert not limiter.allows("2001:db8:1:2::abcd")
    assert limiter.allows("2001:db8:1:3::1")


def test_the_limiter_holds_a_bounded_number_of_addresses() -> None:
    limiter = FailureLimiter(burst=1, refill_seconds=600.0, max_clients=100)
    for n in range(1000):
        limiter.record_failure(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter._clients) == 100
    assert not limiter.allows("10.0.3.231")  # the most recent are kept


# -- bcrypt off the request path -------------------------------------------------------------------


def test_the_gate_serves_clean_clients_first_and_bounds_its_queue() -> None:
    slow = bcrypt.hashpw(b"x", bcrypt.gensalt(10))  # about 60 ms a check
    gate = BcryptGate(threads=1, queue=2)
    results: dict[str, bool | None] = {}

    def check(name: str, priority: float) -> None:
        results[name] = gate.check(b"y", slow, priority)

    threads = [threading.Thread(target=check, args=("running", 5.0))]
    threads[0].start()
    time.sleep(0.02)  # it runs; the next two wait in the queue
    for name in ("flood-1", "flood-2"):
        threads.append(threading.Thread(target=check, args=(name, 5.0)))
        threads[-1].start()
    time.sleep(0.02)
    assert gate.check(b"y", slow, 5.0) is None  # full, and no better than what waits: refused
    threads.append(threading.Thread(target=check, args=("clean", 0.0)))
    threads[-1].start()  # pushes the newest flood entry out
    for thread in threads:
        thread.join(5)
    assert results == {"running": False, "flood-1": False, "flood-2": None, "clean": False}


def test_a_flood_of_wrong_passwords_leaves_a_clean_client_served() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(8)).decode()
    auth = BasicAuth({"prometheus": hashed})
    stop = threading.Event()
    outcomes: list[AuthResult] = []

    def attack(n: int) -> None:
        while not stop.is_set():
            outcomes.append(auth.verify(basic("prometheus", f"guess{n}".encode()), f"10.9.0.{n}"))
            time.sleep(0.002)  # a round trip: a network client cannot ask in a tight loop

    attackers = [threading.Thread(target=attack, args=(n,)) for n in range(64)]
    for thread in attackers:
        thread.start()
    try:
        # Once every attacking address has failed, none of them ranks with a clean client.
        deadline = time.monotonic() + 10
        while outcomes.count(AuthResult.DENIED) < 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        took = []
        for _ in range(5):
            started = time.monotonic()
            assert auth.verify(basic("prometheus", PASSWORD), "192.0.2.10") is AuthResult.OK
            took.append(time.monotonic() - started)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(10)
    assert max(took) < 1.0, took
    # Most of the flood was turned away without a bcrypt check (queue full, or out of budget),
    # and no address got more checks than its failure budget.
    turned_away = outcomes.count(AuthResult.BUSY) + outcomes.count(AuthResult.THROTTLED)
    assert turned_away > outcomes.count(AuthResult.DENIED)
    assert outcomes.count(AuthResult.DENIED) <= 64 * http_auth.FAILURE_BURST


def test_known_good_credentials_pass_even_from_a_throttled_address() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    auth = BasicAuth({"prometheus": hashed}, FailureLimiter(burst=2, refill_seconds=600.0))
    assert auth.verify(basic("prometheus", PASSWORD), "192.0.2.1") is AuthResult.OK
    for _ in range(2):
        assert auth.verify(basic("prometheus", b"no"), "192.0.2.1") is AuthResult.DENIED
    assert auth.verify(basic("prometheus", b"no"), "192.0.2.1") is AuthResult.THROTTLED
    assert auth.verify(basic("prometheus", PASSWORD), "192.0.2.1") is AuthResult.OK  # cached


def test_a_throttled_client_gets_429_and_a_saturated_gate_503() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": hashed}))
    statuses = [
        app.respond(
            "GET", "/-/healthy", {"authorization": basic("prometheus", b"no")}, "192.0.2.9"
        ).status
        for _ in range(http_auth.FAILURE_BURST + 1)
    ]
    assert statuses == [401] * http_auth.FAILURE_BURST + [429]
    app._bcrypt = BcryptGate(threads=1, queue=0)  # nothing may wait
    app.set_web_config(WebConfig(basic_auth_users={"prometheus": hashed}))
    app._bcrypt._running = 1  # as if a check were running
    response = app.respond(
        "GET", "/-/healthy", {"authorization": basic("prometheus", PASSWORD)}, "192.0.2.10"
    )
    assert (response.status, ("Retry-After", "1") in response.headers) == (503, True)


# -- constant time for unknown users ---------------------------------------------------------------


def test_the_dummy_hash_has_the_highest_configured_cost() -> None:
    cheap = bcrypt.hashpw(b"a", bcrypt.gensalt(4)).decode()
    dear = bcrypt.hashpw(b"b", bcrypt.gensalt(11)).decode()
    assert BasicAuth({"a": cheap, "b": dear})._dummy.startswith(b"$2b$11$")
    assert BasicAuth({"a": cheap})._dummy.startswith(b"$2b$04$")


def test_an_unknown_user_takes_as_long_as_a_known_one() -> None:
    # Cost 12 (~0.25 s), the case: against a fixed cost-10 dummy an unknown user answered
    # 4x faster. The bounds leave room for a loaded machine and still catch a 2x difference.
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(12)).decode()
    auth = BasicAuth({"prometheus": hashed}, FailureLimiter(burst=100))

    def median(user: str) -> float:
        took = []
        for n in range(3):
            started = time.perf_counter()
            assert auth.verify(basic(user, b"wrong%d" % n), "192.0.2.1") is AuthResult.DENIED
            took.append(time.perf_counter() - started)
        return statistics.median(took)

    known, unknown = median("prometheus"), median("mallory")
    assert 0.6 < unknown / known < 1.7, (known, unknown)


# -- request heads ---------------------------------------------------------------------------------


def test_parse_head() -> None:
    request = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    assert (request.method, request.target, request.keep_alive) == ("GET", "/metrics?x=1", True)
    assert request.headers == {"host": "a", "accept-encoding": "gzip"}
    assert not parse_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    assert not parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n").keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /a\x01b HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 400),
    ],
)
def test_bad_heads_are_refused(head: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_head(head)
    assert raised.value.status == status


# -- the descriptor budget -------------------------------------------------------------------------


def test_the_budget_raises_the_soft_limit_and_keeps_half_for_the_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit = {"now": (1024, 4096)}
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _: limit["now"])
    monkeypatch.setattr(limits.resource, "setrlimit", lambda _, value: limit.update(now=value))
    assert descriptor_budget() == DescriptorBudget(4096, 1024, limits.MAX_CONNECTIONS)
    limit["now"] = (1024, 1024)
    assert descriptor_budget().max_connections == 512
    limit["now"] = (400, 400)
    assert descriptor_budget().max_connections == 144  # 400 - 256 for the sources
    limit["now"] = (300, 300)
    with pytest.raises(UsageError) as refused:
        descriptor_budget()
    message = str(refused.value)
    assert "RLIMIT_NOFILE) is 300" in message and "LimitNOFILE=" in message
    assert "\n" not in message


# -- the real server: slow clients and the connection cap ------------------------------------------


@pytest.fixture
def small_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebServer]:
    monkeypatch.setattr(limits, "HEADER_DEADLINE_SECONDS", 1.0)
    holder = Holder()
    holder.state = export_state()
    server = WebServer(ListenAddress("127.0.0.1", 0), holder.app(), DescriptorBudget(1024, 1024, 8))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def scrape(server: WebServer) -> tuple[int, float]:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        connection.close()


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_the_header_deadline_is_for_the_whole_head_not_per_read(small_server: WebServer) -> None:
    sock = socket.create_connection(("127.0.0.1", small_server.address.port), timeout=5)
    started = time.monotonic()
    try:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.1 s, never done
            if closed_by_server(sock) or time.monotonic() - started > 4:
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        sock.close()
    assert 0.9 < took < 2.0, took  # closed at the 1 s deadline, although it kept sending


def test_at_the_cap_the_longest_waiting_connection_is_shed(small_server: WebServer) -> None:
    silent = [
        socket.create_connection(("127.0.0.1", small_server.address.port), timeout=5)
        for _ in range(small_server.max_connections)
    ]
    try:
        time.sleep(0.1)
        status, took = scrape(small_server)
        assert (status, took < 1.0) == (200, True)
        time.sleep(0.1)
        assert closed_by_server(silent[0])  # the oldest made room
        assert not closed_by_server(silent[-1])
        assert small_server.open_connections() <= small_server.max_connections
    finally:
        for sock in silent:
            sock.close()


def test_a_kept_alive_scraper_outlasts_newer_silent_connections(small_server: WebServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", small_server.address.port, timeout=5)
    connection.request("GET", "/metrics")
    assert connection.getresponse().read()
    silent = [
        socket.create_connection(("127.0.0.1", small_server.address.port), timeout=5)
        for _ in range(3 * small_server.max_connections)
    ]
    try:
        time.sleep(0.2)
        connection.request("GET", "/metrics")  # the same connection: it was not shed
        response = connection.getresponse()
        assert response.status == 200 and response.read()
    finally:
        connection.close()
        for sock in silent:
            sock.close()


def test_triage_trusts_verified_credentials_and_throttles_without_bcrypt() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    auth = BasicAuth({"prometheus": hashed}, FailureLimiter(burst=2))
    right = basic("prometheus", PASSWORD)
    # Not verified yet: the worker must check it (bcrypt), triage cannot tell.
    assert auth.triage(right, "192.0.2.1") is None
    assert auth.verify(right, "192.0.2.1") is AuthResult.OK
    # Verified once: trusted from any address, before any bcrypt work.
    assert auth.triage(right, "198.51.100.7") is AuthResult.OK
    for n in range(2):
        assert auth.verify(basic("prometheus", b"wrong%d" % n), "203.0.113.9") is AuthResult.DENIED
    # Out of budget: answered 429 by the selector thread, never queued for a worker.
    assert auth.triage(basic("prometheus", b"again"), "203.0.113.9") is AuthResult.THROTTLED
    # Without users there is nothing to triage.
    assert BasicAuth({}).triage(right, "192.0.2.1") is None
