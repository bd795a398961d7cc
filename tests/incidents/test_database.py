"""PostgreSQL at its connection limit (which TCP cannot see) and PostgreSQL backends holding
CLOSE_WAIT sockets after their clients gave up (which TCP sees, spread over one process per
session)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import pytest

from tests.incidents import programs
from tests.incidents.harness import Scene, scene

pytestmark = pytest.mark.integration

PORT = 5432
SESSIONS = 60
LOAD_SECONDS = 90.0  # longer than any test needs on a busy machine: each test stops its own


@dataclass
class Staged:
    server: programs.Server
    loads: tuple[subprocess.Popen[str], ...]


def _pgbench(s: Scene, clients: int, query: str) -> subprocess.Popen[str]:
    bindir = programs.postgres_bindir()
    assert bindir is not None
    script = s.directory / "script.sql"
    script.write_text(query + "\n")
    script.chmod(0o644)
    return s.ns.spawn(
        [str(bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "-n",
         "-c", str(clients), "-j", "2", "-T", f"{LOAD_SECONDS:g}", "-f", str(script),
         "postgres"],
        lifetime=LOAD_SECONDS + 20,
    )  # fmt: skip


def stage_max_connections(s: Scene) -> Staged:
    server = programs.postgres(s.ns, s.directory / "pg", PORT, max_connections=20)
    hold = _pgbench(s, 20, "SELECT pg_sleep(0.05);")
    s.wait_for("20 sessions", lambda: s.sockets("established", PORT) >= 40, 40, hold)
    bindir = programs.postgres_bindir()
    more = s.ns.spawn(
        ["sh", "-c", f"for i in $(seq {int(LOAD_SECONDS * 10)}); do {bindir}/psql -h 127.0.0.1 "
         f"-p {PORT} -U postgres -c 'select 1' postgres >/dev/null 2>&1; done"],
        lifetime=LOAD_SECONDS + 20,
    )  # fmt: skip
    return Staged(server, (hold, more))


def test_postgres_at_max_connections() -> None:
    with scene("database-connection-limit", "db") as s:
        s.serve()
        staged = stage_max_connections(s)
        verdict, _ = s.check()
        served = s.check_from()
        refused = s.ns.run(str(programs.postgres_bindir() / "psql"), "-h", "127.0.0.1", "-p",
                           str(PORT), "-U", "postgres", "-c", "select 1", "postgres",
                           check=False)  # fmt: skip
        for load in staged.loads:
            s.ns.stop(load)
        assert "too many clients" in refused.stderr, refused.stderr
        for judged in (verdict, served):
            # Loopback retransmissions under this load are the receiver's, reported as such.
            judged.only(set(), {("C02", f"127.0.0.1:{PORT}")})
            judged.none_says("loss on the path", "firewall", "host is down")
            for f in judged.findings:
                assert f["severity"] == "info", judged.describe()


def stage_close_wait(s: Scene) -> Staged:
    server = programs.postgres(s.ns, s.directory / "pg", PORT, max_connections=SESSIONS + 10)
    sleepers = _pgbench(s, SESSIONS, "SELECT pg_sleep(60);")
    s.wait_for(
        "sessions sleeping", lambda: s.sockets("established", PORT) >= 2 * SESSIONS, 40, sleepers
    )
    s.ns.stop(sleepers)  # the client gives up; each backend sleeps on in its query
    s.wait_for("CLOSE_WAIT", lambda: s.sockets("close-wait", PORT) >= SESSIONS)
    return Staged(server, ())


def test_postgres_close_wait() -> None:
    with scene("database-close-wait-leak", "db") as s:
        s.serve()
        staged = stage_close_wait(s)
        verdict, _ = s.check()
        served = s.check_from()
        for judged in (verdict, served):
            judged.only({("S01", "postgres")})
            s01 = judged.one("S01", "postgres")
            evidence = s01["evidence"]
            assert evidence["process"] == "postgres", s01
            assert evidence["close_wait_sockets"] == SESSIONS, s01
            assert evidence["processes"] == SESSIONS, s01
            assert "client_connection_check_interval" in s01["remediation"], s01
            assert staged.server.pids, staged
