"""Who may ask and how often: basic auth against bcrypt hashes, and the request rate limit.

Both come from the web config (``basic_auth_users``, ``rate_limit``) as exporter-toolkit defines
them; the app checks them before it routes a request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Callable, Mapping

import bcrypt

from tcpwatch.http.webconfig import RateLimit

_AUTH_CACHE_ENTRIES = 256
# A valid hash of a password nobody has: unknown users cost one bcrypt check too, so response
# time does not tell which user names exist.
_DUMMY_HASH = b"$2b$10$lw0ElSBFrK0ECLDZmsaL7OY8mA0xAl4G5W0GTrYl1t3ubd8HHsRAK"


class BasicAuth:
    """Checks HTTP basic credentials against bcrypt hashes, remembering successes.

    bcrypt is slow on purpose (about 0.1 s at cost 10 here), so a successful check is cached,
    as exporter-toolkit does, keyed by a digest of user, password and hash (a changed hash never
    matches an old entry). Checks run one at a time so a flood of wrong passwords costs one core.
    """

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {user: hashed.encode() for user, hashed in users.items()}
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, authorization: str | None) -> bool:
        if not self._users:
            return True
        credentials = _decode_basic(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        if hashed is not None and key in self._verified:
            return True
        with self._lock:
            try:
                ok = bcrypt.checkpw(password, hashed or _DUMMY_HASH) and hashed is not None
            except ValueError:  # longer than bcrypt's 72 bytes: no stored hash can match
                ok = False
            if ok:
                if len(self._verified) >= _AUTH_CACHE_ENTRIES:
                    self._verified.clear()
                self._verified.add(key)
        return ok


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
