"""`tcpwatch check --window 0` (no daemon) where nginx holds the CLOSE_WAIT sockets and another
process, started first (lower pid), holds many other sockets, beside node_exporter's scrape.

    python benchmarks/bench_check_nginx.py [--pairs 9000] [--leaked 60] [--rounds 5]
        [--before DIR]

Inside a namespace of its own (root; removed at the end): a holder with a listener at fd 3, a
second one that never accepts (nginx's upstream) at fd 4 and ``--pairs`` loopback pairs to
itself; Debian's nginx (master and one worker) proxying to that upstream with
``proxy_ignore_client_abort on``; a client sending ``--leaked`` requests and half-closing each,
so the worker holds that many CLOSE_WAIT sockets while the upstream does not answer. With 50 or
more, S01 needs every one's owner. The trees' checks are alternated in ``--rounds`` rounds, each
round with one node_exporter measure (bench_serve's), CPU from wait4(). The walk's cost is in
which tables it reads: the big one whole, or only up to its listeners (docs/performance.md,
*The one-shot audit again*).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_serve import (  # noqa: E402
    REPOSITORY,
    NodeExporter,
    exporter_cpu,
    log,
    run_once,
    tree_label,
)
from namespace import Namespace  # noqa: E402

NGINX_PORT = 20091
UPSTREAM_PORT = 20092
HOLDER = r"""
import json, os, resource, socket, sys, time
pairs = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
upstream = socket.socket()
upstream.bind(("127.0.0.1", int(sys.argv[2])))
upstream.listen(4096)
held = []
for _ in range(pairs):
    held.append(socket.create_connection(listener.getsockname()))
    held.append(listener.accept()[0])
print(json.dumps({"pid": os.getpid(), "fds": len(os.listdir("/proc/self/fd"))}), flush=True)
time.sleep(3600)
"""
CLIENT = r"""
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    held.append(s)
print("sent", flush=True)
time.sleep(3600)
"""
NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_ignore_client_abort on;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


def close_wait_count(namespace: Namespace) -> int:
    with namespace.entered():
        out = subprocess.run(
            ["ss", "-tanH", "state", "close-wait"], capture_output=True, text=True, check=True
        ).stdout
    return len(out.splitlines())


def read_line(process: subprocess.Popen[str], what: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"{what} exited before it was ready")
    return line.strip()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=9000, help="the big holder's pairs")
    parser.add_argument("--leaked", type=int, default=60, help="CLOSE_WAIT sockets in nginx")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", metavar="DIR", help="another tcpwatch tree to compare")
    args = parser.parse_args(argv)
    trees = [(tree_label(REPOSITORY), REPOSITORY)]
    if args.before:
        trees.append((f"{args.before} (before)", args.before))
    for _, tree in trees:  # bytecode, as the package's postinst makes it (see bench_serve)
        compiled = [sys.executable, "-m", "compileall", "-q", os.path.join(tree, "tcpwatch")]
        subprocess.run(compiled, check=True, stdout=subprocess.DEVNULL)
    workdir = tempfile.mkdtemp(prefix="tw-bnginx-")
    namespace = Namespace.create("tw-bnginx")
    exporter: NodeExporter | None = None
    try:
        python = [sys.executable, "-c"]
        holder = namespace.spawn(
            [*python, HOLDER, str(args.pairs), str(UPSTREAM_PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        big = json.loads(read_line(holder, "the holder"))
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w", encoding="utf-8") as handle:
            handle.write(NGINX_CONF.format(dir=workdir, port=NGINX_PORT, upstream=UPSTREAM_PORT))
        nginx_argv = ["nginx", "-c", conf, "-p", workdir, "-e", os.path.join(workdir, "err.log")]
        namespace.spawn(nginx_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        client = namespace.spawn(
            [*python, CLIENT, str(NGINX_PORT), str(args.leaked)], stdout=subprocess.PIPE, text=True
        )
        read_line(client, "the client")
        for _ in range(100):
            if close_wait_count(namespace) == args.leaked:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"nginx does not hold {args.leaked} CLOSE_WAIT sockets")
        exporter = NodeExporter.start(namespace, os.path.join(workdir, "ne.log"))
        log(f"built: holder pid {big['pid']} with {big['fds']} fds, nginx, {args.leaked} leaked")
        checks: dict[str, list[float]] = {label: [] for label, _ in trees}
        scrapes: list[float] = []
        argv_check = [sys.executable, "-m", "tcpwatch", "check", "--window", "0"]
        for n in range(args.rounds):
            scrapes.append(exporter_cpu(exporter, False))
            for label, tree in trees:
                checks[label].append(run_once(namespace, argv_check, 600, tree).cpu)
            log(f"round {n}: node_exporter {scrapes[-1] * 1000:.1f} ms, " + ", ".join(
                f"{label} {values[-1] * 1000:.1f} ms" for label, values in checks.items()
            ))  # fmt: skip
        scrape = statistics.median(scrapes)
        print(f"\nnginx holds {args.leaked} CLOSE_WAIT; a lower-pid process {big['fds']} fds")
        print("\n| tcpwatch | check --window 0 ms (rounds) | vs node_exporter |")
        print("|---|---:|---:|")
        for label, values in checks.items():
            median = statistics.median(values)
            runs = ", ".join(f"{v * 1000:.0f}" for v in values)
            print(f"| {label} | {median * 1000:.1f} ({runs}) | {median / scrape:.2f}x |")
        print(f"\nnode_exporter: {scrape * 1000:.1f} ms a scrape (median of {len(scrapes)})")
        return 0
    finally:
        if exporter is not None:
            exporter.stop()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace.name], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(Exception):
            namespace.delete()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
