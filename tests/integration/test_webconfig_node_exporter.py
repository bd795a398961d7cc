"""One web config file, two servers: Debian's node_exporter (Go's exporter-toolkit) and
`tcpwatch serve`, side by side on the loopback of a throw-away namespace.

For each file, the same clients (client certificates or none, basic-auth credentials, TLS 1.2
with a given cipher, one key-exchange curve) ask both over TLS, and each must be answered, or
refused, by both alike, and as the file says. Certificates are made with openssl for the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import bcrypt
import pytest

from ..pki import Pki, make_pki
from .netns import REPO_ROOT, Netns, tcpwatch_env

pytestmark = pytest.mark.integration

NODE_EXPORTER = "prometheus-node-exporter"
NODE_PORT, TCPWATCH_PORT = 19100, 19477
START_TIMEOUT = 30.0

# Runs inside the namespace: one request per case, the outcome as a word. "refused" is any
# failed handshake or a connection closed unanswered (Go sends an alert, tcpwatch may close).
_CLIENT = r"""
import http.client, json, ssl, sys, base64
cases, directory = json.loads(sys.argv[1]), sys.argv[2]
results = []
for case in cases:
    context = ssl.create_default_context(cafile=f"{directory}/ca.crt")
    if case["cert"]:
        name = f"{directory}/{case['cert']}"
        context.load_cert_chain(f"{name}.crt", f"{name}.key")
    if case["tls12_cipher"]:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(case["tls12_cipher"])
    if case["curve"]:
        context.set_ecdh_curve(case["curve"])
    headers = {"Connection": "close"}
    if case["user"]:
        token = base64.b64encode(f"{case['user']}:{case['password']}".encode()).decode()
        headers["Authorization"] = "Basic " + token
    connection = http.client.HTTPSConnection("localhost", case["port"], context=context, timeout=10)
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        response.read()
        hsts = response.getheader("Strict-Transport-Security") or ""
        results.append(f"{response.status} {hsts}".strip())
    except (ssl.SSLError, ConnectionError, http.client.HTTPException) as error:
        results.append("refused")
    finally:
        connection.close()
print(json.dumps(results))
"""


@dataclass(frozen=True)
class Client:
    cert: str | None = None
    user: str | None = None
    password: str | None = None
    tls12_cipher: str | None = None
    curve: str | None = None


PASSWORDS = {"prometheus": "scrape-me", "grafana": "look-at-me"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = make_pki(tmp_path_factory.mktemp("pki"))
    # bcrypt hashes for basic_auth_users, cost 4 so the test does not wait on them.
    users = "".join(
        f"  {user}: {bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
        for user, password in PASSWORDS.items()
    )
    (directory.directory / "users.yml").write_text(f"basic_auth_users:\n{users}")
    return directory


def ask(ns: Netns, pki: Pki, ports: list[int], clients: list[Client]) -> list[list[str]]:
    """Each client's outcome, per port."""
    cases = [{**asdict(client), "port": port} for port in ports for client in clients]
    result = ns.run(
        sys.executable, "-c", _CLIENT, json.dumps(cases), str(pki.directory), timeout=60
    )
    outcomes: list[str] = json.loads(result.stdout)
    return [outcomes[i : i + len(clients)] for i in range(0, len(outcomes), len(clients))]


@dataclass
class Pair:
    """node_exporter and tcpwatch serve, both with one web config, in one namespace."""

    ns: Netns
    pki: Pki
    node: subprocess.Popen[str]
    tcpwatch: subprocess.Popen[bytes]
    tcpwatch_log: Path

    def ask(self, clients: list[Client]) -> tuple[list[str], list[str]]:
        """Each client's outcome at node_exporter, then at tcpwatch."""
        node, tcpwatch = ask(self.ns, self.pki, [NODE_PORT, TCPWATCH_PORT], clients)
        return node, tcpwatch

    def exited(self) -> str | None:
        if self.node.poll() is not None:
            return f"node_exporter exited: {self.ns.stderr_of(self.node)}"
        return _exited(self.tcpwatch, self.tcpwatch_log)


def _exited(tcpwatch: subprocess.Popen[bytes], log_path: Path) -> str | None:
    return None if tcpwatch.poll() is None else f"tcpwatch exited: {log_path.read_text()}"


def _start_tcpwatch(ns: Netns, pki: Pki, web_config: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = pki.directory / f"{web_config.name}.tcpwatch.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ns.exec_argv(
                sys.executable, "-m", "tcpwatch", "serve",
                "--listen", f"127.0.0.1:{TCPWATCH_PORT}", "--web-config", str(web_config),
            ),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=tcpwatch_env(), cwd=str(REPO_ROOT),
        )  # fmt: skip
    return process, log_path


def start_pair(ns: Netns, pki: Pki, name: str, web_config: str) -> Pair:
    path = pki.directory / name
    users = (pki.directory / "users.yml").read_text()
    path.write_text(web_config.replace("@users\n", users))
    node = ns.spawn(
        [
            NODE_EXPORTER,
            "--collector.disable-defaults",
            "--collector.loadavg",
            f"--web.listen-address=127.0.0.1:{NODE_PORT}",
            f"--web.config.file={path}",
        ],
        lifetime=300,
    )
    pair = Pair(ns, pki, node, *_start_tcpwatch(ns, pki, path))
    _wait_listening(ns, [NODE_PORT, TCPWATCH_PORT], pair.exited)
    return pair


def _wait_listening(ns: Netns, ports: list[int], exited: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        problem = exited()
        assert problem is None, problem
        listening = ns.ss("-tlnH")
        if all(f":{port} " in listening for port in ports):
            return
        time.sleep(0.2)
    raise AssertionError(f"not listening on {ports} within {START_TIMEOUT} s")


StartPair = Callable[[str, str], Pair]


@pytest.fixture
def pair(netns: Netns, pki: Pki) -> Iterator[StartPair]:
    started: list[Pair] = []

    def start(name: str, web_config: str) -> Pair:
        for old in started:  # one pair at a time: the ports are fixed
            _stop(old)
        started.append(start_pair(netns, pki, name, web_config))
        return started[-1]

    yield start
    for old in started:
        _stop(old)


def _stop(pair: Pair) -> None:
    pair.ns.stop(pair.node)
    if pair.tcpwatch.poll() is None:
        pair.tcpwatch.terminate()
    try:
        pair.tcpwatch.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pair.tcpwatch.kill()
        pair.tcpwatch.wait(timeout=10)


HSTS = "max-age=31536000"
OK = f"200 {HSTS}"
UNAUTHORIZED = f"401 {HSTS}"

# The file the docs show, as a fleet would have it: every TLS key node_exporter 1.5 knows.
FULL = f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  min_version: TLS12
  max_version: TLS13
  cipher_suites:
    - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
    - TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
  prefer_server_cipher_suites: true
  curve_preferences: [X25519, CurveP256]
http_server_config:
  http2: false
  headers:
    Strict-Transport-Security: {HSTS}
    X-Content-Type-Options: nosniff
@users
"""


def test_full_file_same_answers(pair: StartPair, pki: Pki) -> None:
    started = pair("full.yml", FULL)
    right = {"user": "prometheus", "password": PASSWORDS["prometheus"]}
    cases = {
        "verified cert, right password": (Client("prometheus", **right), OK),
        "second user": (Client("other", "grafana", PASSWORDS["grafana"]), OK),
        "wrong password": (Client("prometheus", "prometheus", "nope"), UNAUTHORIZED),
        "unknown user": (Client("prometheus", "nobody", "scrape-me"), UNAUTHORIZED),
        "no credentials": (Client("prometheus"), UNAUTHORIZED),
        "no client certificate": (Client(None, **right), "refused"),
        "self-signed client certificate": (Client("stranger", **right), "refused"),
        "TLS 1.2, a listed cipher": (
            Client("prometheus", tls12_cipher="ECDHE-ECDSA-AES256-GCM-SHA384", **right),
            OK,
        ),
        "TLS 1.2, an unlisted cipher": (
            Client("prometheus", tls12_cipher="ECDHE-ECDSA-AES128-GCM-SHA256", **right),
            "refused",
        ),
        "a listed curve": (Client("prometheus", curve="prime256v1", **right), OK),
        "an unlisted curve": (Client("prometheus", curve="secp384r1", **right), "refused"),
    }
    node, tcpwatch = started.ask([client for client, _ in cases.values()])
    expected = [outcome for _, outcome in cases.values()]
    names = list(cases)
    assert dict(zip(names, node, strict=True)) == dict(zip(names, expected, strict=True))
    assert dict(zip(names, tcpwatch, strict=True)) == dict(zip(names, node, strict=True))


@pytest.mark.parametrize(
    ("auth_type", "expected"),
    [
        # (no certificate, CA-signed, self-signed)
        ("NoClientCert", ["200", "200", "200"]),
        ("RequestClientCert", ["200", "200", "200"]),
        ("RequireAnyClientCert", ["refused", "200", "200"]),
        ("VerifyClientCertIfGiven", ["200", "200", "refused"]),
        ("RequireAndVerifyClientCert", ["refused", "200", "refused"]),
    ],
)
def test_every_client_auth_type_same_answers(
    pair: StartPair, pki: Pki, auth_type: str, expected: list[str]
) -> None:
    ca = "" if auth_type == "NoClientCert" else "  client_ca_file: ca.crt\n"
    started = pair(
        f"{auth_type}.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"  client_auth_type: {auth_type}\n{ca}",
    )
    node, tcpwatch = started.ask([Client(None), Client("prometheus"), Client("stranger")])
    assert node == expected
    assert tcpwatch == node


def test_client_allowed_sans(netns: Netns, pki: Pki) -> None:
    """Debian's node_exporter 1.5 (exporter-toolkit 0.8) predates client_allowed_sans and
    refuses a file with it; tcpwatch answers as the toolkit versions that have it do (a verified
    certificate must also carry a listed SAN). When Debian's node_exporter learns the key, this
    test fails and becomes a side-by-side one."""
    path = pki.directory / "sans.yml"
    path.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        "  client_allowed_sans: [prometheus.example.net]\n"
    )
    node = netns.run(
        "timeout", "20", NODE_EXPORTER, "--collector.disable-defaults",
        f"--web.listen-address=127.0.0.1:{NODE_PORT}", f"--web.config.file={path}",
        check=False, timeout=30,
    )  # fmt: skip
    assert node.returncode == 1, node.stderr
    assert "field client_allowed_sans not found" in node.stderr
    tcpwatch, log_path = _start_tcpwatch(netns, pki, path)
    try:
        _wait_listening(netns, [TCPWATCH_PORT], lambda: _exited(tcpwatch, log_path))
        clients = [Client("prometheus"), Client("other"), Client(None)]
        assert ask(netns, pki, [TCPWATCH_PORT], clients) == [["200", "refused", "refused"]]
    finally:
        tcpwatch.terminate()
        tcpwatch.wait(timeout=10)
