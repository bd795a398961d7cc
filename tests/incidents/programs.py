"""Real programs from Debian's packages, started inside a throw-away namespace for an incident.

Each server runs in the foreground under ``Netns.spawn`` (so it is killed with the namespace at
the latest), from a configuration file written here, with every pid, log and temporary path
under the test's own directory: nothing of the host's /etc, /var or /run is read or written.
Load tools run for a bounded time (``-d``, ``--max-time``, a count) and under the spawn's
lifetime cap. The packages are installed by ``scripts/test``.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.netns import Netns, NetnsError, parse_ss

STARTUP_SECONDS = 30.0
SERVER_LIFETIME = 240.0  # a server outlives no incident by more than this
POSTGRES_BIN = Path("/usr/lib/postgresql")

# Every program the corpus drives, as the tests call it (checked up front by conftest).
PROGRAMS = (
    "nginx", "haproxy", "wrk", "hping3", "redis-server", "redis-benchmark", "curl", "setpriv"
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Server:
    """A real server listening in the namespace: its process and the pid that owns the port."""

    name: str
    process: subprocess.Popen[str]
    port: int
    pids: frozenset[int]  # every pid `ss -ltnp` shows on the listener (nginx: master + worker)


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps one per major version)."""
    versions = sorted(
        (p for p in POSTGRES_BIN.glob("*/bin") if (p / "postgres").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


def missing_programs() -> list[str]:
    """Programs of the corpus this machine lacks (installed by scripts/test)."""
    from shutil import which

    missing = [name for name in PROGRAMS if which(name) is None]
    bindir = postgres_bindir()
    if bindir is None or not all((bindir / name).exists() for name in ("pgbench", "psql")):
        missing.append("postgres, pgbench, psql (Debian postgresql)")
    return missing


def wait_listening(
    ns: Netns, port: int, process: subprocess.Popen[str], what: str
) -> frozenset[int]:
    """Wait until something listens on ``port`` in ``ns``; the pids ss names on it."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NetnsError(f"{what} exited {process.returncode}: {ns.stderr_of(process)!r}")
        for sock in parse_ss(ns.ss("-ltnHp")):
            if sock.local_port == port and sock.processes:
                return frozenset(p.pid for p in sock.processes)
        time.sleep(0.1)
    raise NetnsError(f"{what} did not listen on port {port} in {STARTUP_SECONDS} s: "
                     f"{ns.stderr_of(process)!r}")  # fmt: skip


def _writable_by(path: Path, user: str) -> None:
    """Hand a directory to a service user (postgres refuses to run as root); the test's own
    temp directories above it become traversable (mkdtemp makes them 0700)."""
    entry = pwd.getpwnam(user)
    top = Path(tempfile.gettempdir())
    for parent in (path, *path.parents):
        if parent == top or top not in parent.parents:
            break
        parent.chmod(parent.stat().st_mode | 0o711)
    os.chown(path, entry.pw_uid, entry.pw_gid)


# -- servers ----------------------------------------------------------------------------------


def nginx(
    ns: Netns,
    directory: Path,
    port: int,
    *,
    worker_connections: int = 1024,
    backlog: int | None = None,
    workers: int = 1,
    address: str = "127.0.0.1",
) -> Server:
    """nginx (master and ``workers`` workers) answering 200 to everything on address:port."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = f"{address}:{port}" + (f" backlog={backlog}" if backlog is not None else "")
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = directory / "nginx.conf"
    config.write_text(
        f"""daemon off;
worker_processes {workers};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
{temp}
    server {{
        listen {listen};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )
    process = ns.spawn(
        ["nginx", "-c", str(config), "-p", str(directory), "-e", str(directory / "error.log")],
        lifetime=SERVER_LIFETIME,
    )
    return Server("nginx", process, port, wait_listening(ns, port, process, "nginx"))


def haproxy(
    ns: Netns,
    directory: Path,
    port: int,
    backends: Sequence[tuple[str, str]],
    *,
    server_close: bool = False,
) -> Server:
    """haproxy on 127.0.0.1:port with one backend per (path prefix, address:port); the last is
    the default. ``timeout connect 1s``, no retries: each failed connect is one client error.
    ``server_close``: a new backend connection per request, closed by haproxy
    (``option http-server-close``), as many proxies are configured."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "global",
        "    maxconn 4096",
        f"    pidfile {directory}/haproxy.pid",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 10s",
        "    timeout server 10s",
        "    retries 0",
        *(["    option http-server-close"] if server_close else []),
        "frontend web",
        f"    bind 127.0.0.1:{port}",
    ]
    for index, (prefix, _) in enumerate(backends[:-1]):
        lines.append(f"    use_backend b{index} if {{ path_beg {prefix} }}")
    lines.append(f"    default_backend b{len(backends) - 1}")
    for index, (_, address) in enumerate(backends):
        lines += [f"backend b{index}", f"    server s{index} {address}"]
    config = directory / "haproxy.cfg"
    config.write_text("\n".join(lines) + "\n")
    process = ns.spawn(["haproxy", "-db", "-f", str(config)], lifetime=SERVER_LIFETIME)
    return Server("haproxy", process, port, wait_listening(ns, port, process, "haproxy"))


def redis(ns: Netns, directory: Path, port: int, *, maxclients: int = 10000) -> Server:
    """redis-server on 127.0.0.1:port, nothing persisted, ``maxclients`` clients at most."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "redis.conf"
    config.write_text(
        f"bind 127.0.0.1\nport {port}\nmaxclients {maxclients}\nsave ''\nappendonly no\n"
        f"dir {directory}\npidfile {directory}/redis.pid\nlogfile {directory}/redis.log\n"
        "daemonize no\nprotected-mode yes\n"
    )
    process = ns.spawn(["redis-server", str(config)], lifetime=SERVER_LIFETIME)
    return Server("redis-server", process, port, wait_listening(ns, port, process, "redis"))


def postgres(ns: Netns, directory: Path, port: int, *, max_connections: int = 20) -> Server:
    """PostgreSQL on 127.0.0.1:port, a fresh cluster in ``directory`` run as user postgres
    (it refuses root), trust authentication, ``max_connections``."""
    bindir = postgres_bindir()
    if bindir is None:
        raise NetnsError("PostgreSQL is not installed (Debian postgresql, see scripts/test)")
    directory.mkdir(parents=True, exist_ok=True)
    _writable_by(directory, "postgres")
    data = directory / "data"
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
         "--no-sync", "--no-instructions"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    process = ns.spawn(
        [*as_postgres, str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
         "-p", str(port), "-k", str(directory), "-c", f"max_connections={max_connections}",
         "-c", "superuser_reserved_connections=1", "-c", "fsync=off",
         "-c", "shared_buffers=16MB", "-c", f"unix_socket_directories={directory}"],
        lifetime=SERVER_LIFETIME,
    )  # fmt: skip
    return Server("postgres", process, port, wait_listening(ns, port, process, "postgres"))


# -- load -------------------------------------------------------------------------------------


def wrk(
    ns: Netns,
    url: str,
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
    close: bool = False,
    timeout: float = 2.0,
) -> subprocess.Popen[str]:
    """wrk against ``url`` for ``seconds`` (``close``: a new connection per request)."""
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
            "--timeout", f"{timeout:g}s"]  # fmt: skip
    if close:
        argv += ["-H", "Connection: close"]
    return ns.spawn([*argv, url], lifetime=seconds + 30)


def finish(ns: Netns, process: subprocess.Popen[str], timeout: float) -> str:
    """Everything a bounded load tool printed once it exits (killed after ``timeout``)."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ns.stop(process)
        raise NetnsError(f"{process.args!r} ran past {timeout} s") from None
    return out + ns.stderr_of(process)
