"""Issue 20 item 4: `tcpwatch check` takes the owners from the local daemon, each confirmed.

In a namespace, a listener whose accept queue is full (Q01 names its owner) and `tcpwatch serve`
on the usual local address (polling every hour: its answer stays as its first poll saw it):

* `check --window 0` names the owner `ss -tlnp` names, found through the daemon's answer and
  confirmed with one readlink each: no process' descriptors walked;
* the helper then moves its listener to another descriptor and opens an unrelated socket on the
  old one, so the daemon's (stale) answer points at the wrong socket: check refuses that location,
  walks /proc/*/fd for that socket alone and still names the right owner;
* without a daemon, check walks as before, and says why the daemon's owners were not used.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from .netns import Netns, run_tcpwatch
from .test_serve import start_serve
from .test_top_local_daemon import URL, wait_listening

PORT = 20961
# A listener that never accepts, its queue full of its own connects; on "move" (a file), its
# socket goes to descriptor 200 and an unrelated socket takes its old number.
HELPER = r"""
import os, socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(1)
clients = []
for _ in range(3):
    client = socket.socket()
    client.setblocking(False)
    try:
        client.connect(("127.0.0.1", int(sys.argv[1])))
    except BlockingIOError:
        pass
    clients.append(client)
print("ready", listener.fileno(), flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.05)
old = listener.fileno()
os.dup2(old, 200)
listener.close()
other = socket.socket()  # the lowest free descriptor: the listener's old one
assert other.fileno() == old, (other.fileno(), old)
print("moved", other.fileno(), flush=True)
time.sleep(120)
"""


def ss_owner(ns: Netns) -> tuple[str, int, int]:
    """(process, pid, fd) of the helper's listener, as `ss -tlnp` reports it."""
    line = ns.run("ss", "-tlnpH", f"sport = :{PORT}").stdout
    found = re.search(r'users:\(\("([^"]+)",pid=(\d+),fd=(\d+)\)', line)
    assert found is not None, line
    return found.group(1), int(found.group(2)), int(found.group(3))


def check_json(ns: Netns) -> dict[str, Any]:
    done = run_tcpwatch(ns, "check", "--window", "0", "--format", "json")
    assert done.returncode == 2, (done.stdout, done.stderr)  # Q01 is critical
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def q01_owner(report: dict[str, Any]) -> tuple[str, int]:
    q01 = [f for f in report["findings"] if f["id"] == "Q01" and f["subject"].endswith(f":{PORT}")]
    assert len(q01) == 1, report["findings"]
    return q01[0]["evidence"]["process"], q01[0]["evidence"]["pid"]


def test_check_confirms_the_daemons_owners_and_walks_for_a_stale_one(tmp_path: Path) -> None:
    move = tmp_path / "move"
    with Netns() as ns:
        helper = ns.spawn([sys.executable, "-c", HELPER, str(PORT), str(move)])
        word, old_fd = ns.read_line(helper).split()
        assert word == "ready"
        name, pid, fd = ss_owner(ns)
        assert (pid, fd) == (helper_pid(ns, helper), int(old_fd))

        # No daemon: the walk, and why.
        alone = check_json(ns)
        assert q01_owner(alone) == (name, pid)
        owners = alone["checked"]["owners"]
        assert owners["daemon"] is None and owners["confirmed"] == 0, owners
        assert owners["processes_walked"] >= 1
        assert owners["daemon_note"] == f"no daemon listens at {URL}", owners

        served = start_serve(ns, tmp_path / "serve.log", "--interval", "3600")
        try:
            wait_listening(ns)
            assert wait_ready(ns), served.log()
            report = check_json(ns)
            assert q01_owner(report) == (name, pid)
            owners = report["checked"]["owners"]
            assert owners["daemon"] == (f"{URL} (daemon pid {served.process.pid}, uid 0)"), owners
            # Both listeners (the helper's and the daemon's own), its connects' CLOSE_WAIT
            # none: every owner check wanted came from the daemon, confirmed; nothing walked.
            assert owners["offered"] >= 2 and owners["confirmed"] >= 2, owners
            assert owners["processes_walked"] == 0 and owners["daemon_note"] is None, owners
            text = run_tcpwatch(ns, "check", "--window", "0")
            assert (
                f"owners   {owners['confirmed']} confirmed (one readlink each; "
                f"{owners['offered']} named)" in text.stdout
            ), text.stdout

            # The listener moves: the daemon (next poll in an hour) still says the old fd,
            # which now holds another socket. check must not believe it.
            move.write_text("")
            word, reused = ns.read_line(helper).split()
            assert (word, int(reused)) == ("moved", fd)
            assert ss_owner(ns) == (name, pid, 200)
            stale = check_json(ns)
            assert q01_owner(stale) == (name, pid)
            owners = stale["checked"]["owners"]
            assert owners["daemon"] is not None and owners["daemon_note"] is None, owners
            assert owners["confirmed"] == report["checked"]["owners"]["confirmed"] - 1, owners
            assert owners["processes_walked"] >= 1, owners
        finally:
            served.process.kill()
            served.process.wait(timeout=10)


def helper_pid(ns: Netns, helper: Any) -> int:
    """The helper's own pid: spawn runs it under `timeout`, whose child it is."""
    children = Path(f"/proc/{helper.pid}/task/{helper.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def wait_ready(ns: Netns, timeout: float = 30.0) -> bool:
    """Whether the daemon answered its owners within ``timeout`` (its first poll done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = ns.run("curl", "-sf", f"{URL}/api/v1/owners", check=False)
        if done.returncode == 0 and json.loads(done.stdout)["total"] > 0:
            return True
        time.sleep(0.3)
    return False
