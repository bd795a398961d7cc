"""Who may ask and how often: basic auth against bcrypt hashes, and the request rate limit.

Both come from the web config (``basic_auth_users``, ``rate_limit``) as exporter-toolkit defines
them; the app checks them before it routes a request.

A flood of wrong passwords must neither take the metrics away from the client that has the right
one nor cost unbounded CPU, so password checks are guarded thus:

* a successful check is remembered (keyed by a digest of user, password and stored hash; kept
  across reloads, so only a changed hash needs a new check), so a scraper with valid credentials
  costs bcrypt once, not once per scrape, and is let through before any other request;
* failed checks are budgeted per (client address, user) (an IPv6 client by its /64; every
  unknown user of an address shares one budget): within the budget a check is *clean*, past it
  *throttled*, and throttled checks go after every clean one, at a bounded rate per user
  (tcpwatch.http.checks). A throttled check is still made: a correct password from the address a
  flood comes from (one NAT, one proxy) gets through after the checks waiting before it;
* bcrypt runs on one thread, off the request path: a request waiting for it holds no worker. A
  check that could not be made in time answers 503 (checks busy) or 429 (throttled), and only a
  wrong password counts as a failure: no client is charged for someone else's flood.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tcpwatch.http.checks import Check, CheckLine
from tcpwatch.http.webconfig import RateLimit

AUTH_CACHE_ENTRIES = 256
FAILURE_BURST = 10  # failed checks a client address may make at once, per user ...
FAILURE_REFILL_SECONDS = 6.0  # ... and one more per this many seconds (10 a minute)
FAILURE_CLIENTS = 4096  # (address, user) pairs remembered; least recently seen forgotten first
# A well-formed hash nobody's password matches. Unknown users are checked against it at the
# highest cost configured, so response time does not tell which user names exist.
_DUMMY_TAIL = "lw0ElSBFrK0ECLDZmsaL7OY8mA0xAl4G5W0GTrYl1t3ubd8HHsRAK"
_UNKNOWN_USER = ""  # the lane and budget every unknown user name shares


class AuthResult(enum.Enum):
    OK = "ok"
    DENIED = "denied"  # no, wrong or unknown credentials: 401
    THROTTLED = "throttled"  # too many failures from this client address: 429
    BUSY = "busy"  # the password checks are saturated: 503


def client_key(address: str) -> str:
    """The unit failures are counted in: the address, or its /64 for IPv6 (one host's share)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def dummy_hash(cost: int) -> bytes:
    return f"$2b${cost:02d}${_DUMMY_TAIL}".encode()


class FailureLimiter:
    """A token bucket of failed checks per (client address, user), bounded in the pairs it holds.

    Only wrong passwords are recorded: a check refused as busy or throttled is not the client's
    failure, so no flood can spend another client's budget.
    """

    def __init__(
        self,
        burst: int = FAILURE_BURST,
        refill_seconds: float = FAILURE_REFILL_SECONDS,
        max_clients: int = FAILURE_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(burst)
        self._refill = refill_seconds
        self._max = max_clients
        self._clock = clock
        self._clients: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, key: tuple[str, str], now: float) -> float:
        tokens, updated = self._clients.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - updated) / self._refill)

    def failures(self, address: str, user: str = _UNKNOWN_USER) -> float:
        """How far into its budget a client is: 0 for a client without recent failures."""
        with self._lock:
            return self._burst - self._tokens((client_key(address), user), self._clock())

    def allows(self, address: str, user: str = _UNKNOWN_USER) -> bool:
        with self._lock:
            return self._tokens((client_key(address), user), self._clock()) >= 1

    def record_failure(self, address: str, user: str = _UNKNOWN_USER) -> None:
        key = (client_key(address), user)
        with self._lock:
            now = self._clock()
            self._clients[key] = (max(0.0, self._tokens(key, now) - 1), now)
            self._clients.move_to_end(key)
            while len(self._clients) > self._max:
                self._clients.popitem(last=False)


class VerifiedCache:
    """Digests of credentials bcrypt said yes to, least recently used forgotten first.

    Only successes enter, so a flood cannot push a scraper's entry out; the digest covers the
    stored hash, so a user whose hash changed on reload needs a new check and a removed user
    matches nothing.
    """

    def __init__(self, entries: int = AUTH_CACHE_ENTRIES) -> None:
        self._entries = entries
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            if digest not in self._digests:
                return False
            self._digests.move_to_end(digest)
            return True

    def add(self, digest: bytes) -> None:
        with self._lock:
            self._digests[digest] = None
            self._digests.move_to_end(digest)
            while len(self._digests) > self._entries:
                self._digests.popitem(last=False)


@dataclass(frozen=True, slots=True, eq=False)
class Verdict:
    """What a check decided, and for which stored hash (None: an unknown user). It holds for a
    request answered after a reload only while that user's hash is unchanged."""

    result: AuthResult
    user: str | None = None
    hashed: bytes | None = None


class Pending:
    """A request's credentials waiting in the check line; ``verdict`` is set once done."""

    __slots__ = ("_auth", "_callback", "check", "client", "digest", "hashed", "user", "verdict")

    def __init__(
        self,
        auth: BasicAuth,
        client: str,
        user: str,
        hashed: bytes | None,
        digest: bytes,
        callback: Callable[[Pending], None] | None,
    ) -> None:
        self._auth = auth
        self._callback = callback
        self.client = client
        self.user = user
        self.hashed = hashed
        self.digest = digest
        self.verdict: Verdict | None = None
        self.check: Check | None = None

    def done(self, check: Check) -> None:
        self.verdict = self._auth.conclude(self, check)
        if self._callback is not None:
            self._callback(self)


class BasicAuth:
    """Checks HTTP basic credentials against bcrypt hashes (see the module's docstring)."""

    def __init__(
        self,
        users: Mapping[str, str],
        limiter: FailureLimiter | None = None,
        line: CheckLine | None = None,
        verified: VerifiedCache | None = None,
    ) -> None:
        self._users = {user: hashed.encode() for user, hashed in users.items()}
        costs = [int(hashed[4:6]) for hashed in self._users.values() if hashed[4:6].isdigit()]
        self._dummy = dummy_hash(max(costs, default=10))
        self._limiter = limiter or FailureLimiter()
        self._line = line or CheckLine()
        self._verified = verified or VerifiedCache()

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def holds(self, verdict: Verdict) -> bool:
        """Whether a verdict reached under an earlier web config still holds under this one."""
        if verdict.user is None or verdict.result in (AuthResult.BUSY, AuthResult.THROTTLED):
            return True  # nothing about a stored hash was decided
        return self._users.get(verdict.user) == verdict.hashed

    def begin(
        self,
        authorization: str | None,
        client: str = "",
        on_done: Callable[[Pending], None] | None = None,
    ) -> Verdict | Pending:
        """A verdict at once (no bcrypt needed) or a check queued in the line; ``on_done`` gets
        the Pending when its verdict is in (not called when the check is cancelled)."""
        if not self._users:
            return Verdict(AuthResult.OK)
        credentials = _decode_basic(authorization)
        if credentials is None:
            return Verdict(AuthResult.DENIED)  # no bcrypt spent: how a browser learns to ask
        user, password = credentials
        hashed = self._users.get(user)
        digest = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        if hashed is not None and digest in self._verified:
            return Verdict(AuthResult.OK, user, hashed)
        budget = user if hashed is not None else _UNKNOWN_USER
        pending = Pending(self, client, budget, hashed, digest, on_done)
        throttled = not self._limiter.allows(client, budget)
        pending.check = self._line.submit(
            password,
            hashed or self._dummy,
            lane=budget,
            throttled=throttled,
            priority=0.0 if throttled else self._limiter.failures(client, budget),
            callback=pending.done,
        )
        return pending

    def conclude(self, pending: Pending, check: Check) -> Verdict:
        user = pending.user if pending.hashed is not None else None
        if check.result is None:
            result = AuthResult.THROTTLED if check.throttled else AuthResult.BUSY
            return Verdict(result, user, pending.hashed)
        if check.result and pending.hashed is not None:
            self._verified.add(pending.digest)
            return Verdict(AuthResult.OK, user, pending.hashed)
        self._limiter.record_failure(pending.client, pending.user)
        return Verdict(AuthResult.DENIED, user, pending.hashed)

    def cancel(self, pending: Pending) -> None:
        if pending.check is not None:
            self._line.cancel(pending.check)

    def verify(self, authorization: str | None, client: str = "") -> AuthResult:
        """The verdict, waiting for a check if one is needed (for callers that may block)."""
        started = self.begin(authorization, client)
        if isinstance(started, Verdict):
            return started.result
        check = started.check
        assert check is not None
        while not check.done.wait(0.05):
            self._line.expire()
        assert started.verdict is not None
        return started.verdict.result

    def expire(self) -> None:
        """End the checks that waited too long (see CheckLine.expire)."""
        self._line.expire()


def _decode_basic(authorization: str | None) -> tuple[str, bytes] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class TokenBucket:
    """exporter-toolkit's rate_limit: up to ``burst`` requests at once, refilled one token per
    ``interval_seconds``."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            refill = (now - self._updated) / self._limit.interval_seconds
            self._tokens = min(float(self._limit.burst), self._tokens + refill)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False
