"""Attack and scrape helpers for tests/integration/test_http_attacks*.py, run inside a namespace.

    http_attack.py flood PORT CLIENTS SECONDS USER [--addresses=own|same|rotate:N]
                                                        wrong passwords, each client waiting
    http_attack.py slow PORT CONNECTIONS SECONDS GAP    a header byte per connection every GAP s
    http_attack.py slowread PORT CONNECTIONS ROUNDS GAP never-reading clients, pipelining
    http_attack.py hold PORT COUNT SECONDS              answered kept-alive connections, held
    http_attack.py connflood PORT PROCESSES SECONDS     connect and reset, as fast as it goes
    http_attack.py keepalive PORT MARKER                one request, another once MARKER exists
    http_attack.py load PORT CONNECTIONS SECONDS KIND   versions | names | gzip, kept alive
    http_attack.py resets PORT ROUNDS [--tls]           reset a connection at every stage
    http_attack.py scrape PORT COUNT PAUSE [USER PASSWORD] [--tls] [--timeout=T] [--seconds=S]
                                                        [--delay=S]

The attacks print "started" (or "held N") once under way, then one JSON line of what they saw;
scrape prints one JSON line: each scrape's status and seconds (a fresh connection each time,
the worst case for the server: no kept-alive connection that already earned its place).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import http.client
import json
import multiprocessing
import multiprocessing.sharedctypes
import os
import resource
import secrets
import selectors
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


def rotating_address(n: int) -> str:
    """The n-th of the loopback addresses 127.1.0.1 on (never 127.0.0.1, the scraper's)."""
    return f"127.{1 + n // 62500}.{n // 250 % 250}.{1 + n % 250}"


def flood(port: int, clients: int, seconds: float, user: str, addresses: str = "own") -> None:
    """Wrong passwords from ``clients`` threads, each waiting for its answer before the next.

    ``addresses``: "own" (one address per client, not the scraper's), "same" (every client
    from 127.0.0.1, the scraper's: one NAT), or "rotate:N" (each request from the next of N
    addresses, a new connection each).
    """
    statuses: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    end = time.monotonic() + seconds
    rotate = int(addresses.partition(":")[2] or 0)
    turn = iter(range(1 << 30))

    def source_of(n: int) -> str:
        if addresses == "same":
            return "127.0.0.1"
        if rotate:
            with lock:
                return rotating_address(next(turn) % rotate)
        return f"127.0.{1 + n // 250}.{1 + n % 250}"  # one address per attacker, not .0.1

    def attacker(n: int) -> None:
        connection: http.client.HTTPConnection | None = None
        waited = False
        while time.monotonic() < end:
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(
                        "127.0.0.1", port, timeout=5, source_address=(source_of(n), 0)
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
                if rotate or response.getheader("Connection", "").lower() == "close":
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
        if stage == "client-hello":  # the first bytes of a ClientHello (or of a request), gone
            raw.sendall(b"\x16\x03\x01\x00\x05hello" if tls else b"GET /met")
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


def scrape(
    port: int,
    count: int,
    pause: float,
    user: str = "",
    password: str = "",
    tls: bool = False,
    timeout: float = 10.0,
    seconds: float = 0.0,
    delay: float = 0.0,
) -> None:
    """``count`` scrapes (or as many as fit in ``seconds``), each on a fresh connection, its
    request sent ``delay`` s after the connection (a slow client, a long way away)."""
    results = []
    context = ssl._create_unverified_context() if tls else None
    headers = {"Connection": "close", **(auth_header(user, password) if user else {})}
    end = time.monotonic() + seconds
    while len(results) < count or (seconds and time.monotonic() < end):
        started = time.monotonic()
        try:
            if context is not None:
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    "127.0.0.1", port, timeout=timeout, context=context
                )
            else:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            if delay:
                connection.connect()
                time.sleep(delay)
            connection.request("GET", "/metrics", headers=headers)
            response = connection.getresponse()
            body = response.read()
            status = response.status if body else 0
            connection.close()
        except (OSError, http.client.HTTPException):
            status = -1
        results.append((status, time.monotonic() - started))
        if seconds and time.monotonic() >= end:
            break
        time.sleep(pause)
    print(json.dumps(results), flush=True)


def slow_readers(port: int, connections: int, rounds: int, gap: float) -> None:
    """Every ``gap`` s, ``connections`` connections with a 1-byte receive buffer, each sending
    ~30 KB of pipelined requests and never reading; all closed at the end."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 850
    held: list[socket.socket] = []
    sent = 0
    for turn in range(rounds):
        started = time.monotonic()
        for _ in range(connections):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            sock.settimeout(2)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(requests)
                sent += 1
            except OSError:
                pass
            held.append(sock)
        if turn == 0:
            print("started", flush=True)
        time.sleep(max(0.0, gap - (time.monotonic() - started)))
    for sock in held:
        sock.close()
    print(json.dumps({"connections": len(held), "sent": sent}), flush=True)


def hold(port: int, count: int, seconds: float) -> None:
    """``count`` kept-alive connections that each got one answer, then held idle."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/-/healthy")
            connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            continue
        held.append(connection)
    print(f"held {len(held)}", flush=True)
    time.sleep(seconds)
    print(json.dumps({"held": len(held)}), flush=True)


def connect_flood(port: int, processes: int, seconds: float) -> None:
    """Connect and close (with a reset: no TIME_WAIT to run out of ports), as fast as
    ``processes`` processes go, each with up to 64 non-blocking connects in flight."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    linger = struct.pack("ii", 1, 0)

    def run(counter: multiprocessing.sharedctypes.Synchronized[int], end: float) -> None:
        selector = selectors.DefaultSelector()
        done = 0
        while time.monotonic() < end:
            while len(selector.get_map()) < 64:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                sock.connect_ex(("127.0.0.1", port))
                selector.register(sock, selectors.EVENT_WRITE)
            for key, _ in selector.select(0.5):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                done += 1
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        with counter.get_lock():
            counter.value += done

    counter = multiprocessing.Value("q", 0)
    end = time.monotonic() + seconds
    workers = [multiprocessing.Process(target=run, args=(counter, end)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    print("started", flush=True)
    for worker in workers:
        worker.join(seconds + 10)
    total = int(counter.value)
    print(json.dumps({"connections": total, "per_second": total / seconds}), flush=True)


def kept_alive(port: int, marker: str) -> None:
    """One kept-alive connection: a request, then another once ``marker`` exists (<= 60 s)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/-/healthy")
    response = connection.getresponse()
    response.read()
    print(f"first {response.status}", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        connection.request("GET", "/-/healthy")
        response = connection.getresponse()
        response.read()
        print(f"second {response.status}", flush=True)
    except (OSError, http.client.HTTPException) as error:
        print(f"second {type(error).__name__}", flush=True)


def load(port: int, connections: int, seconds: float, kind: str) -> None:
    """Kept-alive scrapers that each ask as fast as answered: ``kind`` "versions" (a distinct
    OpenMetrics version per request), "names" (a name[] filter), or "gzip"."""
    statuses: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(n: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        count = 0
        while time.monotonic() < end:
            count += 1
            path, headers = "/metrics", {}
            if kind == "versions":
                headers["Accept"] = f"application/openmetrics-text; version=2.{n}.{count}"
            elif kind == "names":
                path = "/metrics?name[]=tcpwatch_listen_queue&name[]=tcpwatch_sockets"
            else:
                headers["Accept-Encoding"] = "gzip"
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
            except (OSError, http.client.HTTPException) as error:
                outcome = type(error).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                statuses[outcome] += 1
        connection.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(connections)]
    for worker in workers:
        worker.start()
    print("started", flush=True)
    for worker in workers:
        worker.join(seconds + 40)
    print(json.dumps(dict(statuses)), flush=True)


def main(argv: list[str]) -> None:
    mode, port, args = argv[1], int(argv[2]), argv[3:]
    options = dict(arg[2:].partition("=")[::2] for arg in args if arg.startswith("--"))
    args = [arg for arg in args if not arg.startswith("--")]
    if mode == "flood":
        flood(port, int(args[0]), float(args[1]), args[2], options.get("addresses", "own"))
    elif mode == "slow":
        slow(port, int(args[0]), float(args[1]), float(args[2]))
    elif mode == "slowread":
        slow_readers(port, int(args[0]), int(args[1]), float(args[2]))
    elif mode == "hold":
        hold(port, int(args[0]), float(args[1]))
    elif mode == "connflood":
        connect_flood(port, int(args[0]), float(args[1]))
    elif mode == "keepalive":
        kept_alive(port, args[0])
    elif mode == "load":
        load(port, int(args[0]), float(args[1]), args[2])
    elif mode == "resets":
        resets(port, int(args[0]), "tls" in options)
    else:
        user, password = [*args[2:], "", ""][:2]
        scrape(
            port, int(args[0]), float(args[1]), user, password, "tls" in options,
            float(options.get("timeout", 10)), float(options.get("seconds", 0)),
            float(options.get("delay", 0)),
        )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv)
