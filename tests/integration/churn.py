"""Connection churn with known outcomes, inside a namespace, for the connection-quality tests.

``start_churn`` runs a helper that keeps closing connections until it is killed (or its lifetime
ends): completed request/response connections to a local listener (outcome ok), non-blocking
connects to a port nothing listens on (refused), non-blocking connects whose SYNs an nftables
rule drops, given up after ``timeout_after`` seconds (timeout), and, with ``lossy``, ping-pong
connections through a rule that drops a share of the segments towards the listener
(retransmissions). Every loop sleeps between rounds, so the rate stays small and bounded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from tests.integration.netns import Netns

CHURN = r"""
import json, select, socket, sys, threading, time
spec = json.loads(sys.argv[1])
host = spec["host"]
stop = time.monotonic() + spec["seconds"]

def listen(port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(512)
    return listener

def echo(conn):
    with conn:
        conn.settimeout(10)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return

def serve(listener):
    while time.monotonic() < stop:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

def exchange(port, rounds, size):
    try:
        with socket.create_connection((host, port), timeout=10) as client:
            for _ in range(rounds):
                client.sendall(b"q" * size)
                got = 0
                while got < size:
                    chunk = client.recv(size - got)
                    if not chunk:
                        return
                    got += len(chunk)
    except OSError:
        pass

def completed():
    while time.monotonic() < stop:
        exchange(spec["ok_port"], 1, 100)
        time.sleep(spec["pause"])

def refused():
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, spec["refused_port"]))
        select.select([], [sock], [], 1.0)
        sock.close()
        time.sleep(spec["pause"])

def timed_out():
    pending = []
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, spec["timeout_port"]))
        pending.append((time.monotonic() + spec["timeout_after"], sock))
        while pending and pending[0][0] <= time.monotonic():
            pending.pop(0)[1].close()  # the client gives up before the kernel does
        time.sleep(spec["pause"])

def lossy():
    while time.monotonic() < stop:
        exchange(spec["lossy_port"], spec["rounds"], 64)

listeners = [listen(spec["ok_port"])]
workers = [completed, refused, timed_out]
if spec["lossy_port"]:
    listeners.append(listen(spec["lossy_port"]))
    workers += [lossy] * 4
for listener in listeners:
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
for worker in workers:
    threading.Thread(target=worker, daemon=True).start()
print("ready", flush=True)
while time.monotonic() < stop:
    time.sleep(0.5)
"""


@dataclass(frozen=True)
class Churn:
    host: str
    ok_port: int
    refused_port: int
    timeout_port: int
    lossy_port: int | None

    def peer(self, port: int) -> str:
        return f"{self.host}:{port}"


def start_churn(
    ns: Netns,
    first_port: int,
    seconds: float,
    lossy: bool = False,
    loss_percent: int = 15,
    pause: float = 0.1,
    timeout_after: float = 1.0,
    host: str = "127.0.0.1",
) -> Churn:
    """Start the churn on ports ``first_port`` (ok) .. ``first_port + 3`` (lossy) of ``host`` (a
    local address); nftables rules in the namespace drop the SYNs to the timeout port (on their
    way out: the connecting task drops its own first SYN, which the tracepoints source can
    attribute) and ``loss_percent`` of the segments to the lossy one."""
    churn = Churn(host, first_port, first_port + 1, first_port + 2,
                  first_port + 3 if lossy else None)  # fmt: skip
    egress = f"tcp dport {churn.timeout_port} tcp flags syn drop"
    rules = []
    if churn.lossy_port is not None:
        rules.append(f"tcp dport {churn.lossy_port} numgen random mod 100 < {loss_percent} drop")
    chain = "; ".join(rules)
    ns.nft(
        f"table inet tw_churn_{first_port} {{\n"
        f"  chain output {{ type filter hook output priority 0; {egress}; }}\n"
        + (f"  chain input {{ type filter hook input priority 0; {chain}; }}\n" if rules else "")
        + "}\n"
    )
    spec = {
        "host": churn.host,
        "ok_port": churn.ok_port,
        "refused_port": churn.refused_port,
        "timeout_port": churn.timeout_port,
        "lossy_port": churn.lossy_port or 0,
        "seconds": seconds,
        "pause": pause,
        "timeout_after": timeout_after,
        "rounds": 20,
    }
    helper = ns.spawn([sys.executable, "-c", CHURN, json.dumps(spec)], lifetime=seconds + 10)
    line = ns.read_line(helper, timeout=30)
    assert line == "ready", f"churn helper said {line!r}: {ns.stderr_of(helper)}"
    return churn
