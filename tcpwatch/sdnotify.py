"""systemd's sd_notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

A message is newline-separated ``KEY=VALUE`` assignments, e.g. the one a reload ends with::

    READY=1
    STATUS=polling every 15s; 2 findings

``NOTIFY_SOCKET`` is a filesystem path (``/run/systemd/notify``) or, starting with ``@``, a
name in the abstract namespace (``@/org/freedesktop/systemd1/notify/123``). Without it (not
started by systemd, or ``Type=simple``) every call is a no-op, so callers never need to ask.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | None:
    """The AF_UNIX address for a ``NOTIFY_SOCKET`` value; None for one we cannot use.

    ``@name`` becomes ``\\0name`` (abstract namespace); a path must be absolute. Other forms
    (systemd 254's ``vsock:CID:PORT``, used only inside VMs) are not supported.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled() advises.

    None when the watchdog is off, or when $WATCHDOG_PID names another process (the variables
    were inherited, not meant for us).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2_000_000


@dataclass(frozen=True, slots=True)
class Notifier:
    """Sends notifications to one socket address; ``address=None`` makes every call a no-op."""

    address: str | None
    watchdog_seconds: float | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket address; not notifying systemd", raw)
        return cls(address, watchdog_period(env, os.getpid()) if address else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False (and a debug line) if it failed.

        A failure never raises: losing a notification must not take the daemon down (systemd
        then times the service out, which says more than a traceback would).
        """
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as error:
            log.debug("sd_notify to %r failed: %s", self.address, error)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) match this message to its reload job.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(*_status(text))


def _status(text: str | None) -> tuple[str, ...]:
    # STATUS is one line: a newline would start a new assignment.
    return () if text is None else (f"STATUS={' '.join(text.splitlines())}",)
