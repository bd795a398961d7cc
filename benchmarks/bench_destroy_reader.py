"""CPU per destroy event of the destroy-event reader alone (``DestroyListener.read_ready``, the
parse and the per-peer table), on a queue of real destroy messages filled beforehand, so the
figure holds no churn generator, no select loop and no wait::

    python benchmarks/bench_destroy_reader.py --connections 6000 --rounds 5 [--before DIR]

Each round, in a throw-away namespace: a reader opens its destroy socket (64 MiB buffer, so
nothing is lost), CONNECTIONS loopback connections open, exchange a byte and close (two events
each, plus the listener's), then the reader's thread CPU is measured over ``read_ready`` calls
until the queue is empty; the reader receives into the slots the daemon's destroy readers share
(256, ``DestroyListener.share``) where the tree has them. With ``--before`` the other tree is
measured in the same run, rounds interleaved, so both share the machine's load. Also: the
syscalls alone (a recv_into loop and recvmmsg of 64, no parsing), on the same kind of queue.
Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from namespace import Namespace

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, socket, sys, time
from tcpwatch.sources.lifecycle import DestroyListener, open_destroy_socket
mode, count = sys.argv[1], int(sys.argv[2])

def churn():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 7000))
    server.listen(512)
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", 7000))
        accepted, _ = server.accept()
        client.sendall(b"x")
        accepted.recv(1)
        accepted.close()
        client.close()
    server.close()
    time.sleep(0.2)

if mode == "reader":
    listener = DestroyListener(receive_buffer=64 << 20)
    if hasattr(listener, "share"):  # the daemon's gathering thread gives it the shared slots
        listener.share({})
    listener.update_context(frozenset({7000}), None, [("127.0.0.1", 7000)])
    churn()
    began = time.thread_time()
    while True:
        before = listener.drain().events
        listener.read_ready()
        if listener.drain().events == before:
            break
    cpu = time.thread_time() - began
    stats = listener.drain()
    result = {"events": stats.events, "lost": stats.lost, "malformed": stats.malformed}
else:
    import ctypes
    sock = open_destroy_socket(64 << 20)
    churn()
    buffer = bytearray(1 << 16)
    events = 0
    began = time.thread_time()
    if mode == "recv_into":
        receive = sock.recv_into
        while True:
            try:
                receive(buffer)
            except BlockingIOError:
                break
            events += 1
    else:
        from tcpwatch.sources.recvbatch import BatchReceiver
        receiver = BatchReceiver(sock.fileno())
        while lengths := receiver.receive():
            events += len(lengths)
    cpu = time.thread_time() - began
    result = {"events": events, "lost": 0, "malformed": 0}
result["us_per_event"] = cpu / result["events"] * 1e6
print(json.dumps(result), flush=True)
"""


def run(namespace: Namespace, tree: Path, mode: str, connections: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    child = namespace.spawn(
        [sys.executable, "-c", CHILD, mode, str(connections)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tree),
    )
    out, _ = child.communicate(timeout=600)
    if child.returncode != 0:
        raise SystemExit(f"{mode} in {tree} failed")
    result: dict[str, float] = json.loads(out)
    if result["lost"]:
        raise SystemExit(f"{mode} in {tree} lost {result['lost']} events: raise the buffer")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", type=Path, help="another tcpwatch tree, measured alike")
    args = parser.parse_args()
    trees = [("this tree", REPO)] + ([("before", args.before)] if args.before else [])
    cases = [(label, tree, "reader") for label, tree in trees]
    cases += [("syscalls only", REPO, "recv_into"), ("syscalls only", REPO, "recvmmsg")]
    figures: dict[tuple[str, str], list[float]] = {}
    events: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for label, tree, mode in cases:  # interleaved: each round measures every case once
            namespace = Namespace.create("tw-bench-dr")
            try:
                result = run(namespace, tree, mode, args.connections)
            finally:
                namespace.delete()
            figures.setdefault((label, mode), []).append(result["us_per_event"])
            events[(label, mode)] = result["events"]
    print(f"{args.connections:,} connections a round, {args.rounds} rounds, medians:\n")
    print("| tree | what | events a round | CPU per event, us (runs) |")
    print("|---|---|---:|---:|")
    for (label, mode), values in figures.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        median = statistics.median(values)
        print(f"| {label} | {mode} | {events[(label, mode)]:,.0f} | {median:.2f} ({runs}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
