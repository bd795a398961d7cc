"""The HTTP layer under hostile load (issues 12, 16, 21): password checks, budgets, timing, limits.

In-process: the auth guards on their own, and the real server on a loopback port. The same
attacks against a real `tcpwatch serve` in a namespace: tests/integration/test_http_attacks.py.
"""

from __future__ import annotations

import base64
import statistics
import threading
import time

import bcrypt
import pytest

from tcpwatch.errors import UsageError
from tcpwatch.http import auth as http_auth
from tcpwatch.http import checks as http_checks
from tcpwatch.http import limits
from tcpwatch.http.auth import (
    AuthResult,
    BasicAuth,
    FailureLimiter,
    Pending,
    Verdict,
    client_key,
)
from tcpwatch.http.checks import Check, CheckLine
from tcpwatch.http.limits import DescriptorBudget, descriptor_budget
from tcpwatch.http.webconfig import WebConfig
from tcpwatch.http.wire import ProtocolError, parse_head

from .test_web import Holder

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


# -- the line of password checks ------------------------------------------------------------------


class HeldBcrypt:
    """bcrypt.checkpw in the check line, held until released; records what it checked and how
    many checks ever ran at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.checked: list[bytes] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()
        real = bcrypt.checkpw

        def held(password: bytes, hashed: bytes) -> bool:
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.release.wait(10)
            with self._lock:
                self.running -= 1
                self.checked.append(password)
            return real(password, hashed)

        monkeypatch.setattr(http_checks.bcrypt, "checkpw", held)


def test_clean_checks_go_first_fewest_failures_first_then_in_arrival_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBcrypt(monkeypatch)
    line = CheckLine(throttled_interval=0.0)
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(4))
    checks = [line.submit(b"first", hashed, "u", throttled=False)]  # runs (held) at once
    time.sleep(0.05)
    checks.append(line.submit(b"throttled", hashed, "u", throttled=True))
    checks.append(line.submit(b"failed-twice", hashed, "u", throttled=False, priority=2.0))
    checks.append(line.submit(b"clean-early", hashed, "u", throttled=False))
    checks.append(line.submit(b"clean-late", hashed, "u", throttled=False))
    held.release.set()
    for check in checks:
        assert check.done.wait(10)
    assert held.checked == [b"first", b"clean-early", b"clean-late", b"failed-twice", b"throttled"]
    assert held.most == 1  # one bcrypt at a time: at most one core, whatever waits


def test_throttled_lanes_take_turns_in_arrival_order_at_a_bounded_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBcrypt(monkeypatch)
    held.release.set()
    line = CheckLine(throttled_interval=0.1)
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(4))
    started = time.monotonic()
    checks = [
        line.submit(password, hashed, lane, throttled=True)
        for password, lane in ((b"a1", "a"), (b"a2", "a"), (b"b1", "b"), (b"a3", "a"))
    ]
    for check in checks:
        assert check.done.wait(10) and check.result is False
    # a1 and b1 at once (different lanes), a2 and a3 one interval apart each.
    assert held.checked == [b"a1", b"b1", b"a2", b"a3"]
    assert time.monotonic() - started >= 0.2


def test_a_check_ends_unchecked_when_it_waits_too_long_or_its_client_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBcrypt(monkeypatch)
    line = CheckLine(wait=0.3)
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(4))
    running = line.submit(b"running", hashed, "u", throttled=False)
    time.sleep(0.05)
    told: list[Check] = []
    cancelled = line.submit(b"cancelled", hashed, "u", throttled=False, callback=told.append)
    expired = line.submit(b"expired", hashed, "u", throttled=False, callback=told.append)
    line.cancel(cancelled)
    time.sleep(0.4)  # past the wait, while the running check still holds the thread
    held.release.set()
    assert expired.done.wait(10) and running.done.wait(10)
    assert (expired.result, running.result) == (None, False)
    assert told == [expired]  # a cancelled check tells nobody
    assert not cancelled.done.is_set()
    assert held.checked == [b"running"]
    assert line.waiting() == 0


def test_a_full_line_refuses_at_once() -> None:
    line = CheckLine(capacity=0)
    check = line.submit(b"x", bcrypt.hashpw(b"x", bcrypt.gensalt(4)), "u", throttled=False)
    assert check.done.is_set() and check.result is None


def test_a_flood_of_wrong_passwords_leaves_a_clean_client_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    concurrent = HeldBcrypt(monkeypatch)
    concurrent.release.set()
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(8)).decode()
    auth = BasicAuth({"prometheus": hashed})
    stop = threading.Event()
    outcomes: list[AuthResult] = []

    def attack(n: int) -> None:
        while not stop.is_set():
            outcomes.append(auth.verify(basic("prometheus", f"guess{n}".encode()), f"10.9.0.{n}"))

    attackers = [threading.Thread(target=attack, args=(n,)) for n in range(64)]
    for thread in attackers:
        thread.start()
    try:
        # Once every attacking address has failed, none of them ranks with a clean client.
        deadline = time.monotonic() + 30
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
            thread.join(20)
    assert max(took) < 1.0, took
    assert concurrent.most == 1  # 64 attackers, one bcrypt at a time
    # Each attacker waited for its answer: the flood asked no faster than bcrypt answered.
    assert len(outcomes) == len(concurrent.checked) - 1, (len(outcomes), len(concurrent.checked))


def test_known_good_credentials_pass_even_from_a_throttled_address() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    auth = BasicAuth({"prometheus": hashed}, FailureLimiter(burst=2, refill_seconds=600.0))
    assert auth.verify(basic("prometheus", PASSWORD), "192.0.2.1") is AuthResult.OK
    for _ in range(3):
        assert auth.verify(basic("prometheus", b"no"), "192.0.2.1") is AuthResult.DENIED
    started = auth.begin(basic("prometheus", PASSWORD), "192.0.2.1")
    assert isinstance(started, Verdict) and started.result is AuthResult.OK  # no check: cached


def test_a_correct_password_from_a_throttled_address_is_still_checked() -> None:
    # Issue 16: a flood from the scraper's own address (one NAT) used up the address's budget
    # before the scraper's first check; its correct password must still get through.
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    limiter = FailureLimiter(burst=2, refill_seconds=600.0)
    auth = BasicAuth({"prometheus": hashed}, limiter)
    for n in range(3):
        assert auth.verify(basic("prometheus", b"guess%d" % n), "192.0.2.1") is AuthResult.DENIED
    assert not limiter.allows("192.0.2.1", "prometheus")
    pending = auth.begin(basic("prometheus", PASSWORD), "192.0.2.1")
    assert isinstance(pending, Pending) and pending.check is not None
    assert pending.check.throttled  # in the throttled lane, after clean checks ...
    assert pending.check.done.wait(10)
    assert pending.verdict is not None and pending.verdict.result is AuthResult.OK  # ... but made


def test_budgets_are_per_address_and_user_and_unknown_users_share_one() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    limiter = FailureLimiter(burst=2, refill_seconds=600.0)
    auth = BasicAuth({"prometheus": hashed, "grafana": hashed}, limiter)
    for user in ("mallory", "eve", "trudy"):
        assert auth.verify(basic(user, b"x"), "192.0.2.1") is AuthResult.DENIED
    assert not limiter.allows("192.0.2.1")  # every unknown name spent one budget
    assert limiter.allows("192.0.2.1", "prometheus") and limiter.allows("192.0.2.1", "grafana")
    for _ in range(2):
        assert auth.verify(basic("grafana", b"x"), "192.0.2.1") is AuthResult.DENIED
    assert not limiter.allows("192.0.2.1", "grafana")
    assert limiter.failures("192.0.2.1", "prometheus") == 0


def test_a_check_that_cannot_be_made_in_time_is_503_or_429_and_no_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBcrypt(monkeypatch)
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    limiter = FailureLimiter(burst=1, refill_seconds=600.0)
    auth = BasicAuth({"prometheus": hashed}, limiter, CheckLine(wait=0.3))
    limiter.record_failure("192.0.2.9", "prometheus")  # this one is out of budget
    auth.begin(basic("prometheus", b"holds the thread"), "192.0.2.1")
    time.sleep(0.05)
    clean = auth.verify(basic("prometheus", PASSWORD), "192.0.2.2")
    throttled = auth.verify(basic("prometheus", PASSWORD), "192.0.2.9")
    held.release.set()
    assert (clean, throttled) == (AuthResult.BUSY, AuthResult.THROTTLED)
    assert limiter.failures("192.0.2.2", "prometheus") == 0  # busy is nobody's failure
    assert limiter.failures("192.0.2.9", "prometheus") == pytest.approx(1, abs=0.01)


def test_a_throttled_client_gets_429_and_checks_busy_503(monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldBcrypt(monkeypatch)
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": hashed}))
    app._line.wait = 0.2  # a short wait, for the test
    headers = {"authorization": basic("prometheus", PASSWORD)}
    app.triage({"authorization": basic("prometheus", b"held")}, "192.0.2.1")
    time.sleep(0.05)
    response = app.respond("GET", "/-/healthy", headers, "192.0.2.10")
    assert (response.status, ("Retry-After", "1") in response.headers) == (503, True)
    for _ in range(http_auth.FAILURE_BURST):
        app._failures.record_failure("192.0.2.11", "prometheus")
    response = app.respond("GET", "/-/healthy", headers, "192.0.2.11")
    assert (response.status, ("Retry-After", "60") in response.headers) == (429, True)
    held.release.set()
    assert app.respond("GET", "/-/healthy", headers, "192.0.2.11").status == 200


def test_the_verified_cache_survives_a_reload_for_an_unchanged_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldBcrypt(monkeypatch)
    held.release.set()
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": hashed}))
    headers = {"authorization": basic("prometheus", PASSWORD)}
    assert app.respond("GET", "/-/healthy", headers, "192.0.2.1").status == 200
    app.set_web_config(WebConfig(basic_auth_users={"prometheus": hashed, "grafana": hashed}))
    assert app.triage(headers, "192.0.2.1").trusted  # no new check after a reload ...
    assert len(held.checked) == 1
    rotated = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    app.set_web_config(WebConfig(basic_auth_users={"prometheus": rotated}))
    assert app.triage(headers, "192.0.2.1").pending is not None  # ... unless the hash changed


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


def test_triage_trusts_verified_credentials_and_queues_the_rest() -> None:
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
    app = Holder().app(WebConfig(basic_auth_users={"prometheus": hashed}))
    right = {"authorization": basic("prometheus", PASSWORD)}
    # Not verified yet: it waits for a check (without a worker), triage cannot tell.
    first = app.triage(right, "192.0.2.1")
    assert not first.trusted and first.pending is not None and first.pending.check is not None
    assert first.pending.check.done.wait(10)
    # Verified once: trusted from any address, before any bcrypt work.
    again = app.triage(right, "198.51.100.7")
    assert again.trusted and again.verdict is not None and again.pending is None
    # No credentials: denied at once, no check.
    bare = app.triage({}, "192.0.2.1")
    assert bare.verdict is not None and bare.verdict.result is AuthResult.DENIED
    # Without users nothing is checked, and nothing is trusted either.
    open_app = Holder().app()
    plain = open_app.triage(right, "192.0.2.1")
    assert not plain.trusted and plain.verdict is not None and plain.pending is None
