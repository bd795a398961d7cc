"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``),
with the standard library only: the browser reads commands from its fd 3 and writes answers and
events to its fd 4, each a JSON message ended by a NUL byte.

    with Browser(ns.exec_argv) as browser:       # chromium inside the test's namespace
        browser.open("http://127.0.0.1:19477/", user="u", password="p")
        browser.wait_for("document.body.dataset.updated > 0")
        counts = browser.evaluate("...")          # a JSON-able value
        browser.screenshot(path)

Every wait is bounded; the browser is killed on exit.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM = "chromium"


class BrowserError(Exception):
    pass


def _to_fd(fd: int, target: int) -> None:
    if fd != target:
        os.dup2(fd, target)
        os.set_inheritable(target, True)


class Browser:
    def __init__(
        self,
        wrap: Callable[..., list[str]] = lambda *argv: list(argv),
        width: int = 1400,
        height: int = 1100,
        timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        executable = shutil.which(CHROMIUM)
        if executable is None:
            raise BrowserError("chromium is not installed (scripts/test installs it)")
        self._profile = tempfile.TemporaryDirectory(prefix="tw-chromium-")
        self._timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self._auth: tuple[str, str] | None = None
        self.auth_challenges = 0
        argv = wrap(
            executable,
            "--headless=new",
            "--no-sandbox",  # as root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={self._profile.name}",
            f"--window-size={width},{height}",
            *extra_args,
            "about:blank",
        )
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Copies at 10 and above, so the dup2 onto 3 and 4 in the child cannot clobber one.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=lambda: (_to_fd(high_r, 3), _to_fd(high_w, 4)),
            pass_fds=(3, 4),
            start_new_session=True,  # its renderers and helpers are killed with it, as a group
        )
        for fd in {to_browser_r, from_browser_w, high_r, high_w}:
            with contextlib.suppress(OSError):
                os.close(fd)
        target = self.call("Target.createTarget", {"url": "about:blank"})
        attached = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self._session = attached["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.call(method, session=True)

    # -- protocol --------------------------------------------------------------------------

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: bool = False
    ) -> dict[str, Any]:
        self._next_id += 1
        wanted = self._next_id  # events handled while waiting send messages of their own
        message: dict[str, Any] = {"id": wanted, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self._timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == wanted:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            if "method" in reply:
                self._event(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer from chromium within {self._timeout} s")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium exited: {self.log()[-2000:]}")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def _event(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        if message.get("method") == "Fetch.authRequired" and self._auth is not None:
            # A browser's login prompt, answered: Chromium then keeps the credentials for the
            # origin, and the page's own fetch() calls reuse them.
            self.auth_challenges += 1
            user, password = self._auth
            self._send_async(
                "Fetch.continueWithAuth",
                {
                    "requestId": message["params"]["requestId"],
                    "authChallengeResponse": {
                        "response": "ProvideCredentials",
                        "username": user,
                        "password": password,
                    },
                },
            )
        elif message.get("method") == "Fetch.requestPaused":
            self._send_async("Fetch.continueRequest", {"requestId": message["params"]["requestId"]})

    def _send_async(self, method: str, params: dict[str, Any]) -> None:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def pump(self, seconds: float) -> None:
        """Handle events for a while (auth challenges of the page's own requests)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(BrowserError):
            while time.monotonic() < deadline:
                message = self._read(deadline)
                if "method" in message:
                    self._event(message)

    # -- what tests use ----------------------------------------------------------------------

    def open(self, url: str, user: str | None = None, password: str | None = None) -> None:
        if user is not None:
            self._auth = (user, password or "")
            self.call("Fetch.enable", {"handleAuthRequests": True}, session=True)
        self.call("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(BrowserError):
                last = self.evaluate(expression)
                if last:
                    return last
            self.pump(0.2)
        raise BrowserError(f"never true within {timeout} s: {expression} (last {last!r})")

    def screenshot(self, path: Path) -> Path:
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=True,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._to_browser)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        time.sleep(0.2)  # the group's last processes let go of the profile
        with contextlib.suppress(OSError):
            os.close(self._from_browser)
        self._log.close()
        shutil.rmtree(self._profile.name, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
