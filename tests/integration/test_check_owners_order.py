"""check finds the true owners when the wanted sockets sit in a small server and a big process
holds thousands of other sockets (the walk's order, tcpwatch/sources/fdwalk.py), against ``ss``.

Inside a throw-away namespace, started in this order (so the big process has the lower pid):

* a holder with a listener at fd 3, a second one that never accepts at fd 4 (nginx's
  upstream) and 1,500 loopback pairs to itself (3,000 more fds);
* nginx (Debian's nginx-light: master and one worker) proxying to that upstream with
  ``proxy_ignore_client_abort on``, so a client that half-closes its connection leaves nginx's
  end in CLOSE_WAIT while the upstream does not answer;
* a client making 60 such requests: 60 CLOSE_WAIT sockets in the nginx worker, S01 fires.

Ascending pids would read the holder's whole table before nginx's (the CLOSE_WAIT sockets are
not in it). The walk reads the small tables first, so it finds nginx's sockets, then the
holder's listeners at fds 3 and 4, and stops: fewer links read than the holder's table alone. Every
owner it names is a process ``ss -tanpe`` lists for that socket.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import Netns, NetnsError, parse_ss, run_tcpwatch, tcpwatch_env

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
PAIRS = 1500
LEAKED = 60  # above S01's warning (50): every CLOSE_WAIT socket's owner is needed
NGINX_PORT = 20091
UPSTREAM_PORT = 20092

HOLDER = r"""
import ctypes, json, os, resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
upstream = socket.socket()  # nginx's upstream: never accepts, never answers
upstream.bind(("127.0.0.1", int(sys.argv[3])))
upstream.listen(512)
held = []
for _ in range(int(sys.argv[2])):
    held.append(socket.create_connection(listener.getsockname()))
    held.append(listener.accept()[0])
fds = len(os.listdir("/proc/self/fd"))
print(json.dumps({"pid": os.getpid(), "fd": listener.fileno(), "fds": fds}), flush=True)
time.sleep(300)
"""

CLIENT = r"""
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    s.shutdown(socket.SHUT_WR)  # nginx's end goes to CLOSE_WAIT; nginx waits on the upstream
    held.append(s)
print("sent", flush=True)
time.sleep(300)
"""

# The narrowed lookup check makes, counting the fd links the walk reads; and the pid order
# the walk used before small tables came first.
WALK = r"""
import json, os
from tcpwatch.config import Config
from tcpwatch.paths import ProcPaths
from tcpwatch.pipeline import Pipeline
from tcpwatch.sources.processes import _scan_order

reads = 0
readlink = os.readlink
def counted(*args, **kwargs):
    global reads
    reads += 1
    return readlink(*args, **kwargs)
os.readlink = counted
pipeline = Pipeline(long_lived=False, cached=False, log_failures=False, owners_for_findings=True)
try:
    state = pipeline.poll(Config(check_window=0.0))
finally:
    pipeline.close()
(snapshot,) = state.snapshots
me = os.stat("/proc/self/ns/net").st_ino
print(json.dumps({
    "reads": reads,
    "owners": {str(i): [o.pid, o.name] for i, o in snapshot.attribution.owners.items()},
    "complete": snapshot.attribution.complete,
    "rules": [f.rule_id for f in state.findings],
    "pid_order": _scan_order(ProcPaths(), frozenset({me})),
}))
"""


def nginx_proxy(ns: Netns, directory: Path) -> Any:
    directory.mkdir(parents=True, exist_ok=True)
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = directory / "nginx.conf"
    config.write_text(
        f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    server {{
        listen 127.0.0.1:{NGINX_PORT};
        location / {{
            proxy_pass http://127.0.0.1:{UPSTREAM_PORT};
            proxy_ignore_client_abort on;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    )
    return ns.spawn(
        ["nginx", "-c", str(config), "-p", str(directory), "-e", str(directory / "error.log")],
        lifetime=300,
    )


def wait_for(ns: Netns, what: str, predicate: Any, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sockets = parse_ss(ns.ss("-tanpeH"), "ss -tanpeH")
        if predicate(sockets):
            return sockets
        time.sleep(0.2)
    raise NetnsError(f"{what} within {timeout} s")


def test_check_names_nginx_without_reading_the_big_table(tmp_path: Path) -> None:
    name = f"tw-big-{secrets.token_hex(2)}"
    with Netns() as ns:
        holder = ns.spawn(
            [sys.executable, "-c", HOLDER, name, str(PAIRS), str(UPSTREAM_PORT)], lifetime=300
        )
        big = json.loads(ns.read_line(holder, timeout=120))
        assert big["fd"] == 3 and big["fds"] > 2 * PAIRS
        nginx = nginx_proxy(ns, tmp_path / "nginx")
        wait_for(
            ns,
            "nginx did not listen",
            lambda socks: any(s.state == "listen" and s.local_port == NGINX_PORT for s in socks),
        )
        client = ns.spawn([sys.executable, "-c", CLIENT, str(NGINX_PORT), str(LEAKED)])
        assert ns.read_line(client, timeout=60) == "sent"
        ss = wait_for(
            ns,
            f"nginx did not hold {LEAKED} CLOSE_WAIT sockets",
            lambda socks: sum(s.state == "close_wait" for s in socks) == LEAKED,
        )
        walk = json.loads(
            ns.run(sys.executable, "-c", WALK, env=tcpwatch_env(), cwd=REPO, timeout=120).stdout
        )
        report = json.loads(run_tcpwatch(ns, "check", "--window", "0", "--format", "json").stdout)
        assert nginx.poll() is None, ns.stderr_of(nginx)

    by_inode = {s.inode: s for s in ss if s.inode}
    close_wait = {s.inode: s for s in ss if s.state == "close_wait"}
    worker = {p.pid for s in close_wait.values() for p in s.processes}
    assert len(worker) == 1 and all(
        p.name == "nginx" for s in close_wait.values() for p in s.processes
    )
    # The owners named are true holders, as ss lists them, and nothing wanted was missed.
    owners = {int(inode): tuple(owner) for inode, owner in walk["owners"].items()}
    assert walk["complete"]
    assert set(close_wait) <= set(owners)
    for inode, (pid, process) in owners.items():
        assert (pid, process) in {(p.pid, p.name) for p in by_inode[inode].processes}, by_inode[
            inode
        ]
    listeners = {s.inode for s in ss if s.state == "listen"}
    assert listeners <= set(owners)
    assert "S01" in walk["rules"]
    # In pid order the big holder came before nginx; the walk read fewer links than its table.
    order = walk["pid_order"]
    assert order.index(big["pid"]) < min(order.index(pid) for pid in worker)
    assert walk["reads"] < big["fds"], walk["reads"]
    # check as a user runs it names the worker as S01's process.
    (s01,) = [f for f in report["findings"] if f["id"] == "S01"]
    assert s01["evidence"]["pid"] in worker
    assert s01["evidence"]["close_wait_sockets"] == LEAKED
