"""The whole daemon's CPU per poll in a quiet namespace, two or more trees alternated (issue 20
item 2).

Run as root from the repository root::

    python benchmarks/bench_quiet.py [--trees /work/main .] [--seconds 40] [--rounds 3]
        [--warmup 6] [--smoke]

A namespace holds bench_serve's ``--quiet`` population (3 listeners, 100 loopback pairs, held
by one process, nothing moving). Each tree's ``tcpwatch serve --interval 1`` is started in it
with ``ip netns exec`` (so tracefs is not mounted and the tracepoints source is down, as in
docs/performance.md's figures), left ``--warmup`` seconds (the first poll walks every process),
then the CPU of all its threads is read from ``/proc/PID/task/*/schedstat`` (nanoseconds, not
clock ticks) over ``--seconds``, with no scrape in between: at ``--interval 1`` that is its CPU
per poll (``--interval 15``: an idle daemon's CPU per second at the defaults). The trees take
turns, ``--rounds`` times; the load average is printed beside each round, since on a shared
machine it moves the figures more than most changes do.

``--smoke`` is a seconds-long run that only shows the benchmark still works (CI runs it:
tests/integration/test_benchmarks_smoke.py); its figures mean nothing.

Everything made is removed in ``finally`` blocks. Exit status: 0, or 2 when the run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import time

PORT = 19479
# The held population: 3 listeners and 100 accepted pairs, then nothing until killed.
HOLDER = """
import socket, sys, time
listeners = []
for n in range(1, 4):
    s = socket.socket()
    s.bind((f"127.0.1.{n}", 8080))
    s.listen(128)
    listeners.append(s)
pairs = []
for i in range(100):
    client = socket.create_connection((f"127.0.1.{i % 3 + 1}", 8080))
    pairs.append((client, listeners[i % 3].accept()[0]))
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""


def thread_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` so far (schedstat's first field, ns)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as file:
            total += int(file.read().split()[0])
    return total


def load() -> str:
    with open("/proc/loadavg", encoding="ascii") as file:
        return file.read().split()[0]


def measure(
    namespace: str, tree: str, warmup: float, seconds: float, interval: str
) -> tuple[float, str]:
    """ms of CPU per second of one tree's ``serve --interval INTERVAL`` in ``namespace``, and
    the load average at the start and the end."""
    env = dict(os.environ, PYTHONPATH=tree)
    argv = ["ip", "netns", "exec", namespace, sys.executable, "-m", "tcpwatch", "serve"]
    argv += ["--interval", interval, "--listen", f"127.0.0.1:{PORT}", "--log.level", "error"]
    serve = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    try:
        time.sleep(warmup)
        if serve.poll() is not None:
            raise RuntimeError(f"serve of {tree} exited with {serve.returncode}")
        before_load = load()
        cpu, wall = thread_cpu_ns(serve.pid), time.monotonic()
        time.sleep(seconds)
        cpu, wall = thread_cpu_ns(serve.pid) - cpu, time.monotonic() - wall
        return cpu / 1e6 / wall, f"{before_load}-{load()}"
    finally:
        serve.terminate()
        try:
            serve.wait(10)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(10)


def label(tree: str) -> str:
    head = subprocess.run(
        ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return head.stdout.strip() if head.returncode == 0 else tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", default=["."], help="tcpwatch trees to compare")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument(
        "--interval", default="1", help="serve's --interval (15: an idle daemon at the defaults)"
    )
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.rounds, args.warmup = 2.0, 1, 3.0
    trees = [os.path.abspath(tree) for tree in args.trees]
    namespace = f"tw-bq-{secrets.token_hex(3)}"
    holder: subprocess.Popen[str] | None = None
    results: dict[str, list[float]] = {tree: [] for tree in trees}
    try:
        subprocess.run(["ip", "netns", "add", namespace], check=True)
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        lifetime = str(len(trees) * args.rounds * (args.seconds + args.warmup + 15) + 60)
        holder = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", HOLDER, lifetime],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != "ready":
            raise RuntimeError("the quiet population did not start")
        what = "per poll" if args.interval == "1" else f"per second at --interval {args.interval}"
        print(f"| round | tree | CPU ms {what} (whole daemon) | load |")
        print("|---|---|---:|---|")
        for round_number in range(1, args.rounds + 1):
            for tree in trees:
                value, loads = measure(namespace, tree, args.warmup, args.seconds, args.interval)
                results[tree].append(value)
                print(f"| {round_number} | {label(tree)} | {value:.2f} | {loads} |", flush=True)
        for tree in trees:
            print(f"| median | {label(tree)} | **{statistics.median(results[tree]):.2f}** | |")
        return 0
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"bench_quiet: {error}", file=sys.stderr)
        return 2
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(10)
        subprocess.run(["ip", "netns", "del", namespace], check=False)


if __name__ == "__main__":
    sys.exit(main())
