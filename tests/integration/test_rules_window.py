"""Findings over a window in `serve`: a listener that drops a connection every 3 s keeps its Q02
finding on every poll of a daemon judging a 5 s window, while a daemon judging the last interval
(1 s) flaps; `check --from` and a direct `check --window 5` then give the same ids.

The helper holds a listener that never accepts (backlog 1, so its queue is full after two
connections) and makes one non-blocking connect every 3 s, closed after 0.5 s: its SYN is
dropped at the listener once (ListenOverflows, the listener's sk_drops), never retried.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from .netns import Netns, run_tcpwatch
from .test_serve import Served, start_serve

pytestmark = pytest.mark.integration

PORT = 21101
LISTENER = f"127.0.0.1:{PORT}"
PERIOD = 3.0

_HELPER = r"""
import socket, sys, time
port, period = int(sys.argv[1]), float(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(1)
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # the queue is full
print("ready", flush=True)
end = time.monotonic() + 120
while time.monotonic() < end:
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", port))  # dropped: the accept queue is full
    time.sleep(0.5)
    client.close()  # before the SYN's first retry at 1 s
    time.sleep(period - 0.5)
"""


def serve_with_window(ns: Netns, directory: Path, port: int, window: str) -> Served:
    config = directory / f"window-{port}.yaml"
    config.write_text(f"rules:\n  window: {window}\n")
    served = start_serve(ns, directory / f"serve-{port}.log", "--listen", f"127.0.0.1:{port}",
                         "--interval", "1", "--config", str(config))  # fmt: skip
    served.port = port
    served.wait_ready()
    return served


def q02_samples(served: Served, seconds: float) -> list[bool]:
    """Whether the daemon's findings hold Q02 for the listener, sampled twice a poll."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, body = served.get("/api/v1/findings")
        assert status == 200, body
        findings = json.loads(body)["findings"]
        samples.append(any((f["id"], f["subject"]) == ("Q02", LISTENER) for f in findings))
        time.sleep(0.5)
    return samples


def test_a_steady_overflow_keeps_its_finding(netns: Netns, tmp_path: Path) -> None:
    helper = netns.spawn([sys.executable, "-c", _HELPER, str(PORT), str(PERIOD)], lifetime=150)
    assert netns.read_line(helper, timeout=30) == "ready", netns.stderr_of(helper)
    windowed = serve_with_window(netns, tmp_path, 19481, "5s")
    last_interval = serve_with_window(netns, tmp_path, 19482, "1s")
    try:
        time.sleep(6.5)  # both daemons have 5 s of history
        steady = q02_samples(windowed, 10)
        flapping = q02_samples(last_interval, 10)
        assert all(steady), steady
        # The control: judged over the last interval, the same overflow comes and goes.
        assert any(flapping) and not all(flapping), flapping

        # check --from and a direct check of the same length agree on this steady host.
        url = f"http://127.0.0.1:{windowed.port}"
        for attempt in range(3):
            direct = run_tcpwatch(netns, "check", "--window", "5", "--format", "json")
            remote = run_tcpwatch(netns, "check", "--from", url, "--format", "json")
            mine = {(f["id"], f["subject"]) for f in json.loads(direct.stdout)["findings"]}
            theirs = {(f["id"], f["subject"]) for f in json.loads(remote.stdout)["findings"]}
            if mine == theirs or attempt == 2:
                break
        assert ("Q02", LISTENER) in mine, direct.stdout
        assert mine == theirs, (direct.stdout, remote.stdout)
        assert json.loads(remote.stdout)["window_seconds"] == pytest.approx(5, abs=1.1)
    finally:
        for served in (windowed, last_interval):
            served.process.kill()
            served.process.wait(timeout=10)
