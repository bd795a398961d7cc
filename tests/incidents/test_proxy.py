"""haproxy in front of backends that fail: a dead one (nothing listens) and a black-holed one (a
firewall drops its SYNs), next to a healthy one. haproxy closes failed connects abortively, so
the kernel clears their destination port from the socket-destroy events; the kernel's
tracepoints kept it (the tracepoints source, tracefs mounted as on a host), and the pipeline
joins the two by local port and address (tcpwatch/peer_join.py): the findings must single out
the failing backend with its port, never the healthy one, and name the errno and haproxy."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

from tests.incidents import programs
from tests.incidents.harness import Scene, scene
from tests.integration.netns import Netns

pytestmark = pytest.mark.integration

WEB_PORT = 8080
PROXY_PORT = 8081
DEAD_PORT = 9999
LOAD_SECONDS = 90.0  # longer than any test needs on a busy machine: each test stops its own
BACKEND_ADDRESS = "10.77.0.2"


@dataclass
class Staged:
    proxy: programs.Server
    loads: tuple[subprocess.Popen[str], ...]


def stage_dead_backend(s: Scene) -> Staged:
    programs.nginx(s.ns, s.directory / "nginx", WEB_PORT)
    backends = [("/api", f"127.0.0.1:{DEAD_PORT}"), ("/", f"127.0.0.1:{WEB_PORT}")]
    proxy = programs.haproxy(s.ns, s.directory / "haproxy", PROXY_PORT, backends,
                             server_close=True)  # fmt: skip
    healthy = programs.wrk(s.ns, f"http://127.0.0.1:{PROXY_PORT}/", connections=20,
                           seconds=LOAD_SECONDS, threads=1)  # fmt: skip
    # Ten requests a second to the dead backend, as a minority of real traffic would be: one
    # curl, paced by --rate, so a busy machine does not slow it down the way a loop of curls is.
    count = int(LOAD_SECONDS * 10)
    api = s.ns.spawn(
        ["sh", "-c", f"curl -s --rate 10/s 'http://127.0.0.1:{PROXY_PORT}/api/[1-{count}]' "
         ">/dev/null"],
        lifetime=LOAD_SECONDS + 20,
    )  # fmt: skip
    return Staged(proxy, (healthy, api))


def test_dead_backend_behind_haproxy() -> None:
    with scene("proxy-dead-backend", "proxy") as s:
        s.serve()
        staged = stage_dead_backend(s)
        verdict, _ = s.check()
        served = s.check_from()
        for load in staged.loads:
            s.ns.stop(load)
        dead = f"127.0.0.1:{DEAD_PORT}"
        for judged in (verdict, served):
            # The destroy events heard 0.0.0.0:<port> -> 127.0.0.1:*; joined to the
            # tracepoints' error reports, the closes count under the dead backend, refused, and
            # never against the healthy backend on the same address (whose connections haproxy
            # cuts abortively too: under the bare address, ok).
            judged.only({("C01", dead)})
            c01 = judged.one("C01", dead)
            evidence = c01["evidence"]
            assert evidence["destination"] == dead, c01
            assert evidence["refused"] >= 10, judged.describe()
            assert evidence["attempts"] == evidence["refused"], c01  # every one failed
            assert c01["severity"] == "critical", c01
            assert evidence["cause"] == "nothing listens", c01
            failed = evidence["connect_failures"]
            assert failed.startswith(f"{dead}: "), c01
            assert "ECONNREFUSED by haproxy" in failed, c01
            assert evidence["failures_per_second"] > 1, c01
            assert "haproxy" in c01["remediation"], c01


def connect_backend_host(proxy: Netns, backend: Netns) -> None:
    """A veth pair: the proxy 10.77.0.1, the backend host 10.77.0.2."""
    proxy.run("ip", "link", "add", "tw-front", "type", "veth", "peer", "name", "tw-back",
              "netns", backend.name)  # fmt: skip
    proxy.run("ip", "addr", "add", "10.77.0.1/24", "dev", "tw-front")
    proxy.run("ip", "link", "set", "tw-front", "up")
    backend.run("ip", "addr", "add", f"{BACKEND_ADDRESS}/24", "dev", "tw-back")
    backend.run("ip", "link", "set", "tw-back", "up")


def stage_blackholed_backend(s: Scene, backend: Netns) -> Staged:
    connect_backend_host(s.ns, backend)
    programs.nginx(backend, s.directory / "nginx", WEB_PORT, address=BACKEND_ADDRESS)
    backend.nft(
        "table inet blackhole {\n  chain input { type filter hook input priority 0; "
        f"tcp dport {WEB_PORT} tcp flags & (syn|ack) == syn drop; }}\n}}\n"
    )
    proxy = programs.haproxy(s.ns, s.directory / "haproxy", PROXY_PORT,
                             [("/", f"{BACKEND_ADDRESS}:{WEB_PORT}")])  # fmt: skip
    load = programs.wrk(s.ns, f"http://127.0.0.1:{PROXY_PORT}/", connections=40,
                        seconds=LOAD_SECONDS, threads=1, timeout=5)  # fmt: skip
    s.wait_for("SYN_SENT to the backend", lambda: s.sockets("syn-sent", WEB_PORT) >= 20)
    return Staged(proxy, (load,))


def test_blackholed_backend_behind_haproxy() -> None:
    with scene("proxy-blackholed-backend", "proxy") as s, Netns(prefix="backend") as backend:
        s.serve()
        staged = stage_blackholed_backend(s, backend)
        verdict, _ = s.check()
        served = s.check_from()
        for load in staged.loads:
            s.ns.stop(load)
        destination = f"{BACKEND_ADDRESS}:{WEB_PORT}"
        for judged in (verdict, served):
            judged.only({("S03", destination), ("C01", destination)})
            s03 = judged.one("S03", destination)
            # A remote host that never answers: here the network (its firewall) is the cause.
            assert "firewall" in s03["remediation"] and "local_listener" not in s03["evidence"]
            # haproxy gave up on the connects (its connect timeout) and closed them abortively:
            # joined to the tracepoints, they are timeouts of the backend, port included.
            c01 = judged.one("C01", destination)
            assert "by haproxy" in c01["evidence"]["connect_failures"], c01
            assert c01["evidence"]["timeout"] >= 10, c01
