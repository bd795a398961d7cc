"""Connection churn on loopback, the one generator the churn tests and benchmarks share.

Run inside the namespace to churn (it prints ``churning`` once connections flow, and stops by
itself after ``--seconds``)::

    python benchmarks/churn.py loop --port 7100 --clients 4 --seconds 20 [--backlog 16]
        [--processes 4 --rate 20000]
    python benchmarks/churn.py nginx --port 7200 --dir DIR --connections 8 --seconds 200

``loop``: a listener on 127.0.0.1:PORT that accepts and closes at once, and ``--clients``
threads that connect, wait for the server's close and close too: the server closes first, so
TIME_WAIT stays on its side and the clients never run out of ports. At most one connection per
client is in flight (and its accepted child), which bounds ESTABLISHED for the exactness tests.
One process is one CPU at most (the GIL): ``--processes N`` runs N such processes on the one
port (SO_REUSEPORT; the first starts the others, which die with it), ``--clients`` threads
each, and ``--rate R`` paces the clients to R connections a second in all (0: as fast as they
go; a client that falls behind catches up at most 0.1 s, never in one burst). On a 2-CPU
machine 4 processes of 2 clients made 23,000 connections/s beside other work, one process
6,000.

``nginx``: the real programs: nginx (``keepalive_timeout 0``: it closes after every response,
config and logs in ``--dir``) and ``wrk -c CONNECTIONS`` opening a connection per request,
~10k connections a second on one core. nginx and wrk are this process' children in its process
group; they die with it (SIGTERM, SIGINT, the deadline, or the parent's death).

Used by tests/integration/test_established_churn.py, benchmarks/bench_soak.py and
benchmarks/bench_churn.py.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve()
PR_SET_PDEATHSIG = 1

NGINX_CONFIG = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 127.0.0.1:{port} backlog=4096; keepalive_timeout 0;
           location / {{ return 200 "ok"; }} }}
}}
"""


def argv(mode: str, *options: object) -> list[str]:
    """The command line that runs this generator: ``[python, churn.py, mode, *options]``."""
    return [sys.executable, str(HERE), mode, *(str(option) for option in options)]


def die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def loop(
    port: int,
    clients: int,
    seconds: float,
    backlog: int,
    processes: int = 1,
    rate: float = 0.0,
    reuseport: bool = False,
) -> None:
    others: list[subprocess.Popen[str]] = []
    if processes > 1:
        share = ["--clients", clients, "--backlog", backlog, "--rate", rate / processes]
        for _ in range(processes - 1):
            others.append(
                subprocess.Popen(
                    argv("loop", "--port", port, "--seconds", seconds, "--reuseport", *share),
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=die_with_parent,
                )
            )
        rate, reuseport = rate / processes, True
    try:
        for other in others:
            assert other.stdout is not None
            if other.stdout.readline().strip() != "churning":
                raise SystemExit("a churning process did not start")
        _loop(port, clients, seconds, backlog, rate, reuseport)
        for other in others:
            other.wait(max(10.0, seconds))
    finally:
        for other in others:
            if other.poll() is None:
                other.kill()
                other.wait(10)


def _loop(
    port: int, clients: int, seconds: float, backlog: int, rate: float, reuseport: bool
) -> None:
    deadline = time.monotonic() + seconds
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    server.bind(("127.0.0.1", port))
    server.listen(backlog)
    server.settimeout(0.5)

    def serve() -> None:
        while time.monotonic() < deadline:
            try:
                child, _ = server.accept()
            except OSError:
                continue
            child.close()
        # Connections still queued are reset, so no client waits for a close that never comes.
        server.close()

    interval = clients / rate if rate > 0 else 0.0

    def client(number: int) -> None:
        due = time.monotonic() + interval * number / clients  # spread the clients' turns
        while time.monotonic() < deadline:
            if interval:
                due += interval
                late = time.monotonic() - due
                if late < 0:
                    time.sleep(-late)
                elif late > 0.1:
                    due = time.monotonic()
            sock = socket.socket()
            try:
                sock.connect(("127.0.0.1", port))
                sock.recv(1)
            except OSError:
                pass
            sock.close()

    threads = [threading.Thread(target=serve)]
    threads += [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    print("churning", flush=True)
    for thread in threads:
        thread.join()


def nginx(port: int, directory: Path, connections: int, seconds: float) -> None:
    config = directory / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=directory, port=port))
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: object) -> None:
        # SIGTERM first: nginx's master then stops its worker; SIGKILL would orphan the worker.
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.monotonic() + seconds
    try:
        children.append(
            subprocess.Popen(
                ["nginx", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        )
        for _ in range(100):  # nginx listens within a second or so
            probe = socket.socket()
            try:
                probe.connect(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        else:
            raise SystemExit(f"nginx does not listen on {port}: {directory / 'error.log'}")
        wrk = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(seconds) + 5}s",
            f"http://127.0.0.1:{port}/",
        ]
        children.append(
            subprocess.Popen(wrk, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        )
        print("churning", flush=True)
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        stop()


def main(arguments: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    loop_mode = modes.add_parser("loop", help="accept-and-close server, connecting clients")
    loop_mode.add_argument("--port", type=int, required=True)
    loop_mode.add_argument("--clients", type=int, default=4)
    loop_mode.add_argument("--backlog", type=int, default=64)
    loop_mode.add_argument("--processes", type=int, default=1, help="processes on the port")
    loop_mode.add_argument("--rate", type=float, default=0.0, help="connections/s in all")
    loop_mode.add_argument("--reuseport", action="store_true", help=argparse.SUPPRESS)
    nginx_mode = modes.add_parser("nginx", help="nginx (keepalive 0) and wrk")
    nginx_mode.add_argument("--port", type=int, required=True)
    nginx_mode.add_argument("--dir", type=Path, required=True)
    nginx_mode.add_argument("--connections", type=int, default=8)
    for mode in (loop_mode, nginx_mode):
        mode.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(arguments)
    if not 0 < args.seconds <= 7200:
        parser.error("--seconds must be 0..7200")
    if args.mode == "loop":
        if not 0 < args.clients <= 64:
            parser.error("--clients must be 1..64")
        if not 0 < args.processes <= 16:
            parser.error("--processes must be 1..16")
        if not 0 <= args.rate <= 1_000_000:
            parser.error("--rate must be 0..1000000")
        loop(
            args.port,
            args.clients,
            args.seconds,
            args.backlog,
            args.processes,
            args.rate,
            args.reuseport,
        )
    else:
        if not 0 < args.connections <= 256:
            parser.error("--connections must be 1..256")
        nginx(args.port, args.dir, args.connections, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
