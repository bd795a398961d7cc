"""What derived ESTABLISHED costs under churn: how often a poll falls back to walking ESTABLISHED,
and the CPU of a poll then (polled as serve polls between destination scans, each poll given the
previous one's table), against a quiet poll of the same population and against `ss -tan`.

Run as root: ``python benchmarks/bench_churn.py [--pairs 9000] [--polls 30]``. In a throw-away
namespace: ``--pairs`` held loopback pairs (a helper holds them), then ``--polls`` polls quiet, then
the same with nginx (keepalive 0) and ``wrk -c8`` opening and closing connections, then `ss -tan`
the same number of times. Each poll runs in one process inside the namespace; its CPU is the
process' own (``time.process_time``). Everything is removed at the end, failure or not.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_HOLD = r"""
import socket, sys, time, resource
pairs = int(sys.argv[1])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(2 * pairs + 100, hard), hard))
server = socket.socket()
server.bind(("127.0.0.1", 7000))
server.listen(4096)
held = []
for _ in range(pairs):
    client = socket.create_connection(("127.0.0.1", 7000))
    held += [client, server.accept()[0]]
print("ready", flush=True)
time.sleep(600)
"""

_POLLS = r"""
import json, subprocess, sys, time
from tcpwatch.config import CollectSettings
from tcpwatch.snapshot import take_snapshot
settings = CollectSettings(process_attribution=False)
# As serve polls between destination scans: each poll given the previous one's table (a poll
# after one that moved counts ESTABLISHED in its one walk).
earlier = take_snapshot(settings).sockets  # imports and first reads out of the way
rows = []
for _ in range(int(sys.argv[1])):
    cpu = time.process_time()
    snap = take_snapshot(settings, earlier=earlier)
    rows.append([time.process_time() - cpu, snap.sockets.churned])
    earlier = snap.sockets
ss = []
for _ in range(int(sys.argv[1])):
    before = time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)
    usage = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    subprocess.run(["ss", "-tan"], stdout=subprocess.DEVNULL, check=True)
    after = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    ss.append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
print(json.dumps({"polls": rows, "ss": ss}))
"""

CHURN = str(REPO / "benchmarks" / "churn.py")  # the shared generator: nginx and wrk here


def run(name: str, *argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *argv], text=True, check=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def polls(name: str, count: int) -> dict[str, list]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = run(name, sys.executable, "-c", _POLLS, str(count), capture_output=True, env=env)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def summary(label: str, data: dict[str, list]) -> None:
    cpu = sorted(row[0] for row in data["polls"])
    fell_back = sum(1 for row in data["polls"] if row[1])
    ss = sorted(data["ss"])
    print(
        f"{label}: tcpwatch poll CPU median {cpu[len(cpu) // 2] * 1e3:.1f} ms, "
        f"fell back in {fell_back}/{len(cpu)}; ss -tan CPU median {ss[len(ss) // 2] * 1e3:.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=9_000)  # 2 fds a pair, 20,000 per process here
    parser.add_argument("--polls", type=int, default=30)
    args = parser.parse_args()
    name = f"twb-{secrets.token_hex(4)}"
    scratch = tempfile.mkdtemp(prefix=f"{name}-")
    subprocess.run(["ip", "netns", "add", name], check=True)
    children: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
    try:
        run(name, "ip", "link", "set", "lo", "up")
        run(name, "sysctl", "-q", "net.ipv4.tcp_max_tw_buckets=16384")
        hold = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", _HOLD, str(args.pairs)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        children.append(hold)
        assert hold.stdout is not None and hold.stdout.readline().strip() == "ready"
        summary(f"quiet, {args.pairs} pairs", polls(name, args.polls))
        churn = ["ip", "netns", "exec", name, sys.executable, CHURN, "nginx", "--port", "7200",
                 "--dir", scratch, "--connections", "8", "--seconds", "600"]  # fmt: skip
        # own session: killing the group takes nginx, its worker and wrk too
        churning = subprocess.Popen(
            churn, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        children.append(churning)
        assert churning.stdout is not None and churning.stdout.readline().strip() == "churning"
        time.sleep(2)
        summary(f"churning, {args.pairs} pairs", polls(name, args.polls))
    finally:
        for child in reversed(children):
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                child.kill()
            child.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
