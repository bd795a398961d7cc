"""A hostile HTTP server for `check --from` and `top --from`, run inside a namespace:

    hostile_http.py PORT DIR

It prints "ready" and serves until killed (the spawn's lifetime caps it). The user name of the
request's basic-auth credentials picks the behaviour, so one server plays every case
(``http://drip:x@127.0.0.1:PORT``):

* ``drip``: the status line one byte every DRIP_SECONDS, never finishing (a timeout per read of
  more than DRIP_SECONDS never fires);
* ``huge`` / ``huge-close``: a HUGE_BYTES body of small JSON lists, with a Content-Length, or
  without one until the connection closes;
* anything else: the file ``DIR/<user><path with / as _>`` (``lying_api_v1_findings``) holds the
  whole raw response, status line and headers included, written by the test.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import threading
import time

DRIP_SECONDS = 2.0
DRIP_MAX_SECONDS = 120.0
HUGE_BYTES = 60 * 1024 * 1024
_HEAD = b'{"schema_version": 2, "status": "OK", "exit_code": 0, "findings": ['
_LISTS = b"[], " * 16384


def _request(conn: socket.socket) -> tuple[str, str]:
    """(user, path) of the request read from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    path = head[0].split(" ")[1].split("?", 1)[0] if head and " " in head[0] else "/"
    user = ""
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "authorization" and value.strip().startswith("Basic "):
            user = base64.b64decode(value.strip()[6:]).decode().partition(":")[0]
    return user, path


def _huge(conn: socket.socket, length: bool) -> None:
    body_length = len(_HEAD) + (HUGE_BYTES // len(_LISTS)) * len(_LISTS) + 3
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {body_length}\r\n" if length else "Connection: close\r\n"
    conn.sendall(head.encode() + b"\r\n" + _HEAD)
    for _ in range(HUGE_BYTES // len(_LISTS)):
        conn.sendall(_LISTS)
    conn.sendall(b"[]]")


def _serve(conn: socket.socket, directory: str) -> None:
    with conn:
        try:
            user, path = _request(conn)
            if user == "drip":
                end = time.monotonic() + DRIP_MAX_SECONDS
                for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                    if time.monotonic() > end:
                        break
                    conn.sendall(bytes([byte]))
                    time.sleep(DRIP_SECONDS)
            elif user in ("huge", "huge-close"):
                _huge(conn, length=user == "huge")
            else:
                name = os.path.join(directory, user + path.replace("/", "_"))
                with open(name, "rb") as file:
                    conn.sendall(file.read())
        except OSError:
            pass  # the client gave up: that is what is being tested


def main(port: int, directory: str) -> None:
    server = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve, args=(conn, directory), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
