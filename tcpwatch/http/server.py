"""The listening socket of `tcpwatch serve`: binding, request threads, TLS, timeouts.

Each request is handed to the :class:`~tcpwatch.http.app.WebApp`; this module only moves bytes.
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tcpwatch import __version__
from tcpwatch.http.app import Response, WebApp, text_response
from tcpwatch.http.listen import ListenAddress, ListenError
from tcpwatch.http.webconfig import client_sans

log = logging.getLogger(__name__)

# Parallel requests beyond this get a quick 503 instead of queueing behind slow ones, as
# node_exporter's --web.max-requests does; Prometheus servers scrape a host a few at a time.
MAX_PARALLEL_REQUESTS = 64
REQUEST_TIMEOUT_SECONDS = 10.0  # idle keep-alive, slow headers, slow TLS handshakes


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its scrape connections
    # Buffered: headers and body leave in one send() (flushed after each request), not as two
    # small writes that Nagle and the client's delayed ACK would hold up by 40 ms.
    wbufsize = 1 << 16
    server_version = f"tcpwatch/{__version__}"
    timeout = REQUEST_TIMEOUT_SECONDS

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        if method not in ("GET", "HEAD"):
            self.close_connection = True  # a request body we will not read may follow
        slots = self.server.slots
        if not slots.acquire(blocking=False):
            self._send(
                method, text_response(HTTPStatus.SERVICE_UNAVAILABLE, "Too many parallel requests")
            )
            return
        try:
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                response = self.server.app.respond(method, self.path, headers)
            except Exception:  # one broken request must not cost the server its thread pool
                log.exception("error answering %s %s", method, self.path)
                response = text_response(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "Internal error (see the log)"
                )
            self._send(method, response)
        finally:
            slots.release()

    def _send(self, method: str, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must never hold up shutdown
    request_queue_size = 128

    def __init__(
        self, family: socket.AddressFamily, address: tuple[Any, ...], dual_stack: bool, app: WebApp
    ) -> None:
        self.address_family = family
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_PARALLEL_REQUESTS)
        self._dual_stack = dual_stack
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: its getfqdn() can wait on DNS for many seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        # As Go's net/http does: a response's last partial segment goes out at once.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.app.web_config.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        tls = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            try:
                tls.do_handshake()
            except (OSError, ValueError) as error:
                log.debug("TLS handshake with %s failed: %s", client_address[0], error)
                return
            allowed = self.app.web_config.tls
            if allowed is not None and allowed.client_allowed_sans:
                sans = client_sans(tls.getpeercert())
                if not set(sans) & set(allowed.client_allowed_sans):
                    log.info(
                        "refused TLS client %s: no allowed SAN in its certificate (%s)",
                        client_address[0],
                        ", ".join(sans) or "none",
                    )
                    return
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and timeouts from clients are routine; never a traceback on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class WebServer:
    """The listening socket and its serving thread."""

    def __init__(self, listen: ListenAddress, app: WebApp) -> None:
        self._listen = listen
        self._server = _bind(listen, app)
        self._thread: threading.Thread | None = None
        host, port = self._server.server_address[:2]
        self.address = ListenAddress(str(host), int(port))
        app.listening_on = str(self.address)

    @property
    def url(self) -> str:
        scheme = "https" if self._server.app.web_config.ssl_context is not None else "http"
        host = self.address.host
        if host in ("::", "0.0.0.0"):
            host = "localhost"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.address.port}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="http"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()  # returns within poll_interval
            self._thread.join(timeout=1.0)
        self._server.server_close()


def _bind(listen: ListenAddress, app: WebApp) -> _Server:
    if listen.host == "":
        try:
            return _Server(socket.AF_INET6, ("::", listen.port), True, app)
        except OSError as error:
            if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise ListenError(_bind_failure(listen, error)) from None
        # No IPv6 in this kernel or namespace: every IPv4 address will do.
        return _try_bind(listen, socket.AF_INET, ("0.0.0.0", listen.port), app)
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(
            f'cannot listen on {listen}: cannot resolve "{listen.host}": {error.strerror}'
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return _try_bind(listen, family, sockaddr, app)


def _try_bind(
    listen: ListenAddress, family: socket.AddressFamily, address: tuple[Any, ...], app: WebApp
) -> _Server:
    try:
        return _Server(family, address, False, app)
    except OSError as error:
        raise ListenError(_bind_failure(listen, error)) from None


def _bind_failure(listen: ListenAddress, error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        reason = "the port is already in use (another tcpwatch or exporter running?)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = "no interface of this host has that address"
    elif error.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    return f"cannot listen on {listen}: {reason}"
