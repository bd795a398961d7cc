"""Attack and scrape helpers for tests/integration/test_http_attacks*.py, run inside a namespace.

    http_attack.py flood PORT CLIENTS SECONDS USER      wrong passwords from CLIENTS addresses
    http_attack.py slow PORT CONNECTIONS SECONDS GAP    a header byte per connection every GAP s
    http_attack.py resets PORT ROUNDS [--tls]           reset a connection at every stage
    http_attack.py scrape PORT COUNT PAUSE [USER PASSWORD] [--tls]

flood and slow print "started" once under way, then one JSON line of what they saw; scrape
prints one JSON line: each scrape's status and seconds (a fresh connection each time, the worst
case for the server: no kept-alive connection that already earned its place).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import http.client
import json
import resource
import secrets
import socket
import ssl
import struct
import sys
import threading
import time

# Where a client can reset its connection, from before its first byte to idle after an answer.
STAGES = ("connect", "client-hello", "handshake", "head", "body", "response", "idle")


def auth_header(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def flood(port: int, clients: int, seconds: float, user: str) -> None:
    statuses: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    end = time.monotonic() + seconds

    def attacker(n: int) -> None:
        source = f"127.0.{1 + n // 250}.{1 + n % 250}"  # one address per attacker, not .0.1
        connection: http.client.HTTPConnection | None = None
        waited = False
        while time.monotonic() < end:
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(
                        "127.0.0.1", port, timeout=5, source_address=(source, 0)
                    )
                    connection.connect()
                    if not waited:
                        waited = True
                        ready.wait(10)
                connection.request(
                    "GET", "/metrics", headers=auth_header(user, secrets.token_hex(8))
                )
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as error:
                outcome = type(error).__name__
                if connection is not None:
                    connection.close()
                connection = None
            with lock:
                statuses[outcome] += 1

    threads = [threading.Thread(target=attacker, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait(10)
    print("started", flush=True)
    for thread in threads:
        thread.join(seconds + 10)
    print(json.dumps(dict(statuses)), flush=True)


def slow(port: int, connections: int, seconds: float, gap: float) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    drip = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
    opened = reopened = refused = 0

    def connect() -> tuple[socket.socket, int] | None:
        nonlocal opened, refused
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            refused += 1
            return None
        opened += 1
        return sock, 0

    held = [connect() for _ in range(connections)]
    print("started", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        round_started = time.monotonic()
        for index, entry in enumerate(held):
            if entry is None:
                held[index] = connect()
                continue
            sock, sent = entry
            try:
                sock.send(drip[sent : sent + 1])
                held[index] = (sock, sent + 1)
            except OSError:  # shed or timed out by the server: come back, as an attacker would
                sock.close()
                reopened += 1
                held[index] = connect()
        time.sleep(max(0.0, gap - (time.monotonic() - round_started)))
    print(json.dumps({"opened": opened, "reopened": reopened, "refused": refused}), flush=True)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the server's next read or write fails."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def _read_response(sock: socket.socket) -> None:
    """One whole response (headers and Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the body ended")
        body += chunk


def reset_at(port: int, stage: str, tls: bool) -> None:
    """Open a connection, take it to ``stage`` and reset it there."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if stage == "response":  # a receive buffer that fills at once: the server is mid-write
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    sock = raw
    try:
        if stage == "connect":
            return
        if stage == "client-hello":  # the first bytes of a ClientHello (or of a request)
            raw.sendall(b"\x16\x03\x01\x00\x05hello" if tls else b"GET /met")
            time.sleep(0.01)
            return
        context = ssl._create_unverified_context()
        if stage == "handshake":
            if tls:  # our ClientHello, then the server's first bytes, then gone
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                machine = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
                with contextlib.suppress(ssl.SSLWantReadError):
                    machine.do_handshake()
                raw.sendall(outgoing.read())
                raw.recv(64)
            else:
                raw.sendall(b"GET /metrics HTTP/1.1\r\n")
            return
        if tls:
            sock = context.wrap_socket(raw, server_hostname="localhost")
        if stage == "head":
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: te")
        elif stage == "body":
            sock.sendall(b"POST /metrics HTTP/1.1\r\nContent-Length: 4000\r\n\r\n" + b"x" * 100)
        elif stage == "response":
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
            sock.recv(1)
        elif stage == "idle":
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            _read_response(sock)
        time.sleep(0.05)  # let the server get to its part of the stage
    finally:
        _reset(sock)


def resets(port: int, rounds: int, tls: bool) -> None:
    """Every stage ``rounds`` times; prints what each stage's attempts ended in."""
    seen: dict[str, collections.Counter[str]] = {}
    for stage in STAGES:
        outcomes = seen.setdefault(stage, collections.Counter())
        for _ in range(rounds):
            try:
                reset_at(port, stage, tls)
                outcomes["reset"] += 1
            except (OSError, ssl.SSLError) as error:
                outcomes[type(error).__name__] += 1
    print(json.dumps({stage: dict(counts) for stage, counts in seen.items()}), flush=True)


def scrape(port: int, count: int, pause: float, user: str, password: str, tls: bool) -> None:
    results = []
    context = ssl._create_unverified_context() if tls else None
    headers = {"Connection": "close", **(auth_header(user, password) if user else {})}
    for _ in range(count):
        started = time.monotonic()
        try:
            if context is not None:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    "127.0.0.1", port, timeout=10, context=context
                )
            else:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/metrics", headers=headers)
            response = connection.getresponse()
            body = response.read()
            status = response.status if body else 0
            connection.close()
        except (OSError, http.client.HTTPException):
            status = -1
        results.append((status, time.monotonic() - started))
        time.sleep(pause)
    print(json.dumps(results), flush=True)


def main(argv: list[str]) -> None:
    mode, port = argv[1], int(argv[2])
    if mode == "flood":
        flood(port, int(argv[3]), float(argv[4]), argv[5])
    elif mode == "slow":
        slow(port, int(argv[3]), float(argv[4]), float(argv[5]))
    elif mode == "resets":
        resets(port, int(argv[3]), "--tls" in argv)
    else:
        rest = [arg for arg in argv[5:] if arg != "--tls"]
        user, password = [*rest, "", ""][:2]
        scrape(port, int(argv[3]), float(argv[4]), user, password, "--tls" in argv)


if __name__ == "__main__":
    main(sys.argv)
