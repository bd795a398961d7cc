"""TLS from a web config, over loopback, with certificates made for each run (tests/pki.py):
server auth, every client_auth_type, client_allowed_sans, cipher suites and curves for real.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest

from tcpwatch.config import Config
from tcpwatch.http.app import Health, WebApp
from tcpwatch.http.listen import ListenAddress
from tcpwatch.http.server import WebServer
from tcpwatch.http.webconfig import WebConfigError, load_web_config

from ..pki import Pki, make_pki

StartServer = Callable[[str], WebServer]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write_web_config(pki: Pki, body: str) -> str:
    path = pki.directory / "web.yml"
    path.write_text(body)
    return str(path)


@pytest.fixture
def serve_with(pki: Pki) -> Iterator[StartServer]:
    servers: list[WebServer] = []

    def start(web_yml: str) -> WebServer:
        config = load_web_config(write_web_config(pki, web_yml))
        app = WebApp(lambda: None, Config, Health, config, include_process_metrics=False)
        server = WebServer(ListenAddress("127.0.0.1", 0), app)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def client_context(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca.crt"])
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}.crt"], pki[f"{cert}.key"])
    return context


def https_get(
    server: WebServer, context: ssl.SSLContext, path: str = "/-/healthy", **headers: str
) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection(
        "localhost", server.address.port, context=context, timeout=5
    )
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_tls_serves_and_plain_http_is_refused(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    assert server.url.startswith("https://127.0.0.1:")
    assert https_get(server, client_context(pki)) == (200, b"Healthy\n")
    # A plain HTTP client gets a 400 that says why (as Go's servers answer), not a reset.
    plain = http.client.HTTPConnection("127.0.0.1", server.address.port, timeout=5)
    plain.request("GET", "/-/healthy")
    response = plain.getresponse()
    assert response.status == 400
    assert response.read() == b"Client sent an HTTP request to an HTTPS server.\n"
    plain.close()
    assert https_get(server, client_context(pki))[0] == 200


def test_min_version_is_enforced(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  min_version: TLS13\n"
    )
    old_client = client_context(pki)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        https_get(server, old_client)
    assert https_get(server, client_context(pki))[0] == 200


def test_client_certificates_required_and_verified(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
    )
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(server, client_context(pki))  # no client certificate


def test_client_allowed_sans(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        "  client_allowed_sans: [prometheus.example.net]\n"
    )
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
    # Verified by the CA, but not a SAN on the list: the connection is closed unanswered.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(server, client_context(pki, "other"))


def test_basic_auth_over_tls(pki: Pki, serve_with: StartServer) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    assert https_get(server, client_context(pki))[0] == 401
    token = base64.b64encode(b"prometheus:s3cret").decode()
    assert https_get(server, client_context(pki), Authorization=f"Basic {token}")[0] == 200


def test_a_slow_handshake_does_not_block_other_clients(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    with socket.create_connection(("127.0.0.1", server.address.port), timeout=5):
        # connected, never says hello: its handshake waits in its own thread
        assert https_get(server, client_context(pki))[0] == 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot read {dir}/missing.crt: No such "
            "file or directory",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: prometheus.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot load the certificate "
            "{dir}/server.crt with the key {dir}/prometheus.key: key values mismatch",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: encrypted.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot load the certificate "
            "{dir}/server.crt with the key {dir}/encrypted.key: the key file is encrypted; "
            "tcpwatch needs an unencrypted key",
        ),
        (
            "tls_server_config:\n  cert_file: server.ext\n  key_file: server.key\n",
            "{dir}/web.yml: tls_server_config.cert_file: cannot load the certificate "
            "{dir}/server.ext with the key {dir}/server.key: not a valid PEM file",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: server.ext\n",
            "{dir}/web.yml: tls_server_config.client_ca_file: cannot load client CA "
            "certificates: no certificate or crl found",
        ),
    ],
)
def test_certificate_problems_are_reported_at_load(pki: Pki, body: str, expected: str) -> None:
    with pytest.raises(WebConfigError) as caught:
        load_web_config(write_web_config(pki, body))
    assert caught.value.errors == [expected.format(dir=pki.directory)]


def test_inline_client_ca(pki: Pki, serve_with: StartServer) -> None:
    ca = Path(pki["ca.crt"]).read_text()
    indented = "\n".join("    " + line for line in ca.splitlines())
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca: |\n{indented}\n"
    )
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200


def handshake(server: WebServer, context: ssl.SSLContext) -> tuple[str, str]:
    """(TLS version, cipher) of a completed handshake that was then answered over HTTP."""
    with (
        socket.create_connection(("127.0.0.1", server.address.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert tls.recv(64).startswith(b"HTTP/1.")
        cipher = tls.cipher()
        assert cipher is not None
        return cipher[1], cipher[0]


def test_cipher_suites_limit_tls12_and_leave_tls13_alone(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256]\n"
    )
    tls12 = client_context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(server, tls12) == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
    tls12.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, tls12)
    # TLS 1.3 suites are not configurable: every one still works, as with Go.
    assert handshake(server, client_context(pki))[0] == "TLSv1.3"


def test_cipher_suites_of_tls13_only_leave_tls13_only(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  cipher_suites: [TLS_AES_256_GCM_SHA384]\n"
    )
    tls12 = client_context(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, tls12)
    assert handshake(server, client_context(pki))[0] == "TLSv1.3"


@pytest.mark.parametrize("curves", ["[CurveP384]", "[X25519, CurveP384]"])
def test_curve_preferences_are_the_only_groups_offered(
    pki: Pki, serve_with: StartServer, curves: str
) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"  curve_preferences: {curves}\n"
    )
    p256_only = client_context(pki)
    p256_only.set_ecdh_curve("prime256v1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, p256_only)
    p384_only = client_context(pki)
    p384_only.set_ecdh_curve("secp384r1")
    assert handshake(server, p384_only)[0] == "TLSv1.3"


def test_require_any_client_cert_takes_an_unverified_one(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAnyClientCert\n"
        "  client_allowed_sans: [prometheus.example.net]\n"
    )
    # Self-signed, known to no CA: Go's RequireAnyClientCert takes it, and so does tcpwatch;
    # client_allowed_sans still applies to it.
    assert https_get(server, client_context(pki, "stranger"))[0] == 200
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(server, client_context(pki, "other"))  # a SAN not on the list
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(server, client_context(pki))  # no certificate at all


def test_request_client_cert_takes_any_or_none(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequestClientCert\n  client_ca_file: ca.crt\n"
    )
    for cert in ("stranger", "prometheus", None):
        assert https_get(server, client_context(pki, cert))[0] == 200, cert


def test_verify_client_cert_if_given(pki: Pki, serve_with: StartServer) -> None:
    server = serve_with(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n"
    )
    assert https_get(server, client_context(pki))[0] == 200
    assert https_get(server, client_context(pki, "prometheus"))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_get(server, client_context(pki, "stranger"))


def test_inline_certificate_and_key(pki: Pki, serve_with: StartServer) -> None:
    def indented(name: str) -> str:
        return "\n".join("    " + line for line in Path(pki[name]).read_text().splitlines())

    server = serve_with(
        f"tls_server_config:\n  cert: |\n{indented('server.crt')}\n"
        f"  key: |\n{indented('server.key')}\n"
    )
    assert https_get(server, client_context(pki)) == (200, b"Healthy\n")
