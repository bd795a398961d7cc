"""Shared by the tests of the views (page, top, check --from) and scripts/screenshots: a problem
host in one namespace, watched by `tcpwatch serve` from a second (so the viewers' own
connections never change the counts being compared with ss)."""

from __future__ import annotations

import os
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.served.port}"

    @property
    def auth_url(self) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.served.port}"


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
    tmp: Path, auth: bool = True, hostile: bool = True, interval: float = 1.0
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
        if auth:
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
            web = tmp / "web.yaml"
            web.write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n")
            args += ["--web-config", str(web)]
        served = start_serve(viewer, tmp / "serve.log", *args)
        try:
            _wait_ready(served, auth)
            yield ProblemHost(host, viewer, served, full, leaker)
        finally:
            if served.process.poll() is None:
                served.process.kill()
            served.process.wait(timeout=10)


def _wait_ready(served: Served, auth: bool, timeout: float = 30.0) -> None:
    # /-/ready answers 401 too when auth is on: readiness is the first poll's log line or a 401.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert served.process.poll() is None, f"tcpwatch serve exited: {served.log()}"
        try:
            status = served.get("/-/ready")[0]
        except Exception:  # not listening yet
            status = 0
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
