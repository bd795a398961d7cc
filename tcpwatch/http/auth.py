"""Who may ask and how often: basic auth against bcrypt hashes, and the request rate limit.

Both come from the web config (``basic_auth_users``, ``rate_limit``) as exporter-toolkit defines
them; the app checks them before it routes a request.

A flood of wrong passwords must not take the metrics away from the one client that has the
right one, so password checks are guarded three ways:

* a successful check is remembered (keyed by a digest of user, password and stored hash), so a
  scraper with valid credentials costs bcrypt once, not once per scrape;
* failed checks (and checks refused as busy) are limited per client address (an IPv6 client by
  its /64): past the budget a client gets 429 without any bcrypt work;
* bcrypt runs on its own small pool with a short bounded queue, never on the request threads'
  time: when the queue is full a request gets 503 at once, and a client without recent failures
  goes ahead of those with failures, so a flood cannot hold a clean client's first check back.
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

import bcrypt

from tcpwatch.http.webconfig import RateLimit

AUTH_CACHE_ENTRIES = 256
FAILURE_BURST = 10  # failed checks a client address may make at once ...
FAILURE_REFILL_SECONDS = 6.0  # ... and one more per this many seconds (10 a minute)
FAILURE_CLIENTS = 4096  # addresses remembered; the least recently seen is forgotten first
BCRYPT_THREADS = 1  # as exporter-toolkit: one check at a time, one core at most
# Checks waiting beyond the running ones; more get 503 at once. Running plus waiting stays well
# under the HTTP workers (tcpwatch.http.limits.WORKERS): a request waiting for bcrypt holds a
# worker, so this is what keeps workers free for scrapes whose credentials are remembered.
BCRYPT_QUEUE = 2
BCRYPT_WAIT_SECONDS = 5.0
# A well-formed hash nobody's password matches. Unknown users are checked against it at the
# highest cost configured, so response time does not tell which user names exist.
_DUMMY_TAIL = "lw0ElSBFrK0ECLDZmsaL7OY8mA0xAl4G5W0GTrYl1t3ubd8HHsRAK"


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
    """A token bucket of failed checks per client address, bounded in the clients it holds."""

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
        self._clients: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, updated = self._clients.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - updated) / self._refill)

    def failures(self, address: str) -> float:
        """How far into its budget a client is: 0 for a client without recent failures."""
        with self._lock:
            return self._burst - self._tokens(client_key(address), self._clock())

    def allows(self, address: str) -> bool:
        with self._lock:
            return self._tokens(client_key(address), self._clock()) >= 1

    def record_failure(self, address: str) -> None:
        key = client_key(address)
        with self._lock:
            now = self._clock()
            self._clients[key] = (max(0.0, self._tokens(key, now) - 1), now)
            self._clients.move_to_end(key)
            while len(self._clients) > self._max:
                self._clients.popitem(last=False)


class _Check:
    """One queued bcrypt check; ``result`` None until done (or when it was pushed out)."""

    __slots__ = ("done", "hashed", "password", "priority", "result", "seq")

    def __init__(self, password: bytes, hashed: bytes, priority: float, seq: int) -> None:
        self.password = password
        self.hashed = hashed
        self.priority = priority
        self.seq = seq
        self.result: bool | None = None
        self.done = threading.Event()


class BcryptGate:
    """Runs bcrypt checks on at most ``threads`` threads with at most ``queue`` waiting.

    The threads start when work arrives and end when the queue is empty, so a gate dropped on
    reload leaves nothing behind. Lower ``priority`` goes first; a full queue pushes out its
    worst entry for a better newcomer, else refuses the newcomer (both get None: busy).
    """

    def __init__(self, threads: int = BCRYPT_THREADS, queue: int = BCRYPT_QUEUE) -> None:
        self._threads = threads
        self._queue_size = queue
        self._queue: list[_Check] = []
        self._running = 0
        self._seq = 0
        self._lock = threading.Lock()

    def check(
        self, password: bytes, hashed: bytes, priority: float, wait: float = BCRYPT_WAIT_SECONDS
    ) -> bool | None:
        with self._lock:
            self._seq += 1
            job = _Check(password, hashed, priority, self._seq)
            if self._running >= self._threads and len(self._queue) >= self._queue_size:
                if not self._queue:
                    return None
                worst = max(self._queue, key=lambda queued: (queued.priority, queued.seq))
                if worst.priority <= priority:
                    return None
                self._queue.remove(worst)
                worst.done.set()
            self._queue.append(job)
            if self._running < self._threads:
                self._running += 1
                threading.Thread(target=self._work, name="bcrypt", daemon=True).start()
        if not job.done.wait(wait):
            with self._lock:
                if job in self._queue:
                    self._queue.remove(job)
            return None
        return job.result

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running -= 1
                    return
                job = min(self._queue, key=lambda queued: (queued.priority, queued.seq))
                self._queue.remove(job)
            try:
                job.result = bcrypt.checkpw(job.password, job.hashed)
            except ValueError:  # longer than bcrypt's 72 bytes: no stored hash can match
                job.result = False
            job.done.set()


class BasicAuth:
    """Checks HTTP basic credentials against bcrypt hashes (see the module's docstring)."""

    def __init__(
        self,
        users: Mapping[str, str],
        limiter: FailureLimiter | None = None,
        gate: BcryptGate | None = None,
    ) -> None:
        self._users = {user: hashed.encode() for user, hashed in users.items()}
        costs = [int(hashed[4:6]) for hashed in self._users.values() if hashed[4:6].isdigit()]
        self._dummy = dummy_hash(max(costs, default=10))
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._limiter = limiter or FailureLimiter()
        self._gate = gate or BcryptGate()

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def triage(self, authorization: str | None, client: str = "") -> AuthResult | None:
        """What :meth:`verify` would answer without any bcrypt work, or None when it needs some:
        OK for credentials verified before, THROTTLED for an address out of failure budget.
        Cheap (a hash and a lookup), so the server asks it before a request takes a worker."""
        if not self._users:
            return None
        credentials = _decode_basic(authorization)
        if credentials is None:
            return None
        user, password = credentials
        hashed = self._users.get(user)
        if hashed is not None:
            key = hashlib.sha256(b"\0".join((user.encode(), password, hashed))).digest()
            with self._lock:
                if key in self._verified:
                    return AuthResult.OK
        if not self._limiter.allows(client):
            return AuthResult.THROTTLED
        return None

    def verify(self, authorization: str | None, client: str = "") -> AuthResult:
        if not self._users:
            return AuthResult.OK
        credentials = _decode_basic(authorization)
        if credentials is None:
            return AuthResult.DENIED  # no bcrypt spent: how a browser learns it must ask
        user, password = credentials
        hashed = self._users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        with self._lock:
            if hashed is not None and key in self._verified:
                return AuthResult.OK
        if not self._limiter.allows(client):
            return AuthResult.THROTTLED
        result = self._gate.check(password, hashed or self._dummy, self._limiter.failures(client))
        if result is None:
            # Turned away unchecked, it still counts against the address: a flood that is only
            # ever refused as busy must not stay "clean" and rank with a client that asks once.
            self._limiter.record_failure(client)
            return AuthResult.BUSY
        if result and hashed is not None:
            with self._lock:
                if len(self._verified) >= AUTH_CACHE_ENTRIES:
                    self._verified.clear()
                self._verified.add(key)
            return AuthResult.OK
        self._limiter.record_failure(client)
        return AuthResult.DENIED


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
