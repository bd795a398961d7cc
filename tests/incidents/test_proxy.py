"""haproxy in front of backends that fail: a dead one (nothing listens) and a black-holed one (a
firewall drops its SYNs), next to a healthy one. haproxy closes failed connects abortively, so
the kernel clears their destination port from the socket-destroy events: the findings must still
single out the failing address, never the healthy backend, and name the port, the errno and
haproxy, which the kernel's tracepoints kept (the tracepoints source, tracefs mounted as on a
host)."""

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
        for judged in (verdict, served):
            judged.only({("C01", "127.0.0.1")})
            c01 = judged.one("C01", "127.0.0.1")
            evidence = c01["evidence"]
            # The failed connects are judged on their own: against the connections haproxy cut
            # the same way (it closes its server connections abortively too), not against every
            # connection to the address.
            assert evidence["aborted"] >= 10, judged.describe()
            assert evidence["attempts"] == evidence["aborted"] + evidence["ok"], c01
            assert c01["severity"] in ("warning", "critical"), c01
            # The tracepoints kept what the destroy events lost: port, errno, process.
            assert evidence["port"] == str(DEAD_PORT), c01
            failed = evidence["connect_failures"]
            assert failed.startswith(f"127.0.0.1:{DEAD_PORT}: "), c01
            assert "ECONNREFUSED by haproxy" in failed and "unknown" not in c01["title"], c01
            assert evidence["failures_per_second"] > 1, c01
            assert "haproxy" in c01["remediation"] and "SO_LINGER" in c01["remediation"]


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
            judged.only({("S03", destination), ("C01", BACKEND_ADDRESS)})
            s03 = judged.one("S03", destination)
            # A remote host that never answers: here the network (its firewall) is the cause.
            assert "firewall" in s03["remediation"] and "local_listener" not in s03["evidence"]
            c01 = judged.one("C01", BACKEND_ADDRESS)
            assert c01["evidence"]["port"] == str(WEB_PORT), c01
            assert "by haproxy" in c01["evidence"]["connect_failures"], c01
            assert c01["evidence"]["aborted"] >= 10, c01
