"""Shared by the tests of the views (page, top, check --from) and scripts/screenshots: a problem
host in one namespace, watched by `tcpwatch serve` from a second (so the viewers' own
connections never change the counts being compared with ss)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from . import populations
from .netns import REPO_ROOT, Netns, parse_ss
from .test_serve import Served, start_serve

PORT = 19477
USER = "oncall"
PASSWORD = "3am-pager"
HOSTILE_NAME = "<script>tw"  # a process may name itself anything (15 bytes at most)
FULL_PORT = populations.STANDARD_PORTS["accept_queue_full"]
CLOSE_WAIT_PORT = populations.STANDARD_PORTS["close_wait"]


@dataclass
class ProblemHost:
    host: Netns  # the sockets
    viewer: Netns  # tcpwatch serve and whoever looks at it
    served: Served
    full: populations.Population
    leaker: populations.Population
    ca_file: Path | None = None  # with TLS: the CA that signed the daemon's certificate

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.served.port}"

    @property
    def auth_url(self) -> str:
        return f"{self.scheme}://{USER}:{PASSWORD}@127.0.0.1:{self.served.port}"


def _openssl(directory: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, its key), made with openssl."""
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(directory, "req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=tcpwatch views test CA")  # fmt: skip
    _openssl(directory, "req", "-new", *curve, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "server.crt",
             "-extfile", "server.ext")  # fmt: skip
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def ss_counts(ns: Netns) -> dict[tuple[str, str], int]:
    """(family, state) -> sockets, as `ss -tanH -4` and `-6` count them."""
    counts: Counter[tuple[str, str]] = Counter()
    for family, flag in (("ipv4", "-4"), ("ipv6", "-6")):
        for sock in parse_ss(ns.ss("-tanH", flag)):
            counts[(family, sock.state)] += 1
    return dict(counts)


def listener_owner(ns: Netns, port: int) -> str:
    """``name[pid]`` of the process ss shows on the listener of ``port``."""
    for sock in parse_ss(ns.ss("-ltnHp")):
        if sock.local_port == port and sock.processes:
            return f"{sock.processes[0].name}[{sock.processes[0].pid}]"
    raise AssertionError(f"no listener with an owner on port {port}")


def artifacts_dir() -> Path:
    """Where tests leave screenshots for people: $TCPWATCH_ARTIFACTS or build/test-artifacts."""
    path = Path(os.environ.get("TCPWATCH_ARTIFACTS") or REPO_ROOT / "build" / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def problem_host(
    tmp: Path, auth: bool = True, hostile: bool = True, interval: float = 1.0, tls: bool = False
) -> Iterator[ProblemHost]:
    """A full accept queue, CLOSE_WAIT held by a process (named ``<script>tw`` when ``hostile``)
    and TIME_WAIT, watched by a serve in a viewer namespace that polls it (and itself)."""
    with Netns() as host, Netns() as viewer:
        full = populations.standard(host, "accept_queue_full")
        leaker = populations.close_wait(
            host,
            count=16,
            port=CLOSE_WAIT_PORT,
            process_name=HOSTILE_NAME if hostile else "tw-leaker",
            orphaned=6,
        )
        populations.standard(host, "time_wait_client")
        populations.standard(host, "established")
        config = tmp / "config.yaml"
        config.write_text(
            "collect:\n  attribute_states: [close_wait]\nrules:\n  S01: {warning: 5}\n"
        )
        args = ["--listen", f"127.0.0.1:{PORT}", "--interval", str(interval)]
        args += ["--netns", f"{host.name},self", "--config", str(config)]
        web = ""
        if auth:
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
            web += f"basic_auth_users:\n  {USER}: '{hashed}'\n"
        ca_file = None
        if tls:
            ca_file, cert, key = make_certificates(tmp)
            web += f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
        if web:
            (tmp / "web.yaml").write_text(web)
            args += ["--web-config", str(tmp / "web.yaml")]
        served = start_serve(viewer, tmp / "serve.log", *args)
        try:
            _wait_ready(served, auth, ca_file)
            yield ProblemHost(host, viewer, served, full, leaker, ca_file)
        finally:
            if served.process.poll() is None:
                served.process.kill()
            served.process.wait(timeout=10)


_READY = """
import http.client, ssl, sys
if sys.argv[2]:
    c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), timeout=10,
                                    context=ssl.create_default_context(cafile=sys.argv[2]))
else:
    c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
c.request("GET", "/-/ready")
print(c.getresponse().status)
"""


def _wait_ready(served: Served, auth: bool, ca_file: Path | None, timeout: float = 30.0) -> None:
    # With auth on, /-/ready answers 401 until the password is given: that is ready enough.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert served.process.poll() is None, f"tcpwatch serve exited: {served.log()}"
        done = served.ns.run(sys.executable, "-c", _READY, str(served.port), str(ca_file or ""),
                             check=False, timeout=15)  # fmt: skip
        status = int(done.stdout) if done.returncode == 0 and done.stdout.strip() else 0
        if status == 200 or (auth and status == 401):
            time.sleep(2.5)  # two polls: rates and history have a point before
            return
        time.sleep(0.2)
    raise AssertionError(f"not ready within {timeout} s; log: {served.log()}")


def equal_to_ss(page: Mapping[str, Mapping[str, int]], ss: Mapping[tuple[str, str], int]) -> str:
    """'' when the page's counts (state -> family/total -> n) equal ss's, else the differences."""
    wrong = []
    for state in populations.TCP_STATE_CODES:
        for family in ("ipv4", "ipv6"):
            if page[state][family] != ss.get((family, state), 0):
                wrong.append(
                    f"{state}/{family}: {page[state][family]} vs ss {ss.get((family, state), 0)}"
                )
        total = ss.get(("ipv4", state), 0) + ss.get(("ipv6", state), 0)
        if page[state]["total"] != total:
            wrong.append(f"{state}/total: {page[state]['total']} vs ss {total}")
    return "; ".join(wrong)
