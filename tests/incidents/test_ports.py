"""A real client without connection reuse (redis-benchmark -k 0) exhausts the ephemeral ports
towards redis-server: the finding names that destination, not the server."""

from __future__ import annotations

import subprocess

import pytest

from tests.incidents import programs
from tests.incidents.harness import Scene, scene

pytestmark = pytest.mark.integration

PORT = 6379
DESTINATION = f"127.0.0.1 -> 127.0.0.1:{PORT}"


def stage_exhaustion(s: Scene) -> subprocess.Popen[str]:
    s.ns.sysctl("net.ipv4.ip_local_port_range", "40000 40999")
    s.ns.sysctl("net.ipv4.tcp_tw_reuse", "0")  # as towards a server on another host
    programs.redis(s.ns, s.directory / "redis", PORT)
    client = s.ns.spawn(["redis-benchmark", "-p", str(PORT), "-k", "0", "-c", "20",
                         "-n", "100000", "-t", "ping", "-q"], lifetime=60)  # fmt: skip
    s.wait_for("TIME_WAIT filling the range", lambda: s.sockets("time-wait", PORT) >= 950)
    return client


def test_client_exhausts_ephemeral_ports() -> None:
    with scene("ports-exhaustion", "client") as s:
        # serve scans destinations every collect.destinations_interval (60 s by default); the
        # incident is seconds old when it is asked, so it scans every 2 s here.
        s.serve("collect:", "  destinations_interval: 2s")
        client = stage_exhaustion(s)
        verdict, _ = s.check()
        served = s.check_from()
        output = programs.finish(s.ns, client, 60)
        assert "Cannot assign requested address" in output, output
        for judged in (verdict, served):
            # K08: the narrow range is true and part of the cause.
            judged.only({("P01", DESTINATION)}, {("K08", "")})
            p01 = judged.one("P01", DESTINATION)
            assert p01["severity"] == "critical", judged.describe()
            assert p01["evidence"]["time_wait"] >= 900, p01
