"""Issue 21 item 8: `tcpwatch top` reads the daemon at the configured listen address on its own
only when it can verify it. In a namespace with a full accept queue (`check` says CRITICAL):

* an unprivileged user (nobody) serves a made-up "all is well" API on 127.0.0.1:9477: root's
  `top -b` polls the host instead, says why in its header, and shows CRITICAL; `--from` still
  reads the made-up API when asked to;
* root runs something that is not tcpwatch there: polled too, the header naming the process;
* root runs `tcpwatch serve` there: `top -b` reads it and its header names the daemon's pid.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tcpwatch.render import api
from tcpwatch.state import ExportState
from tests.unit.snapshots import T1, snapshot

from . import populations
from .netns import Netns, run_tcpwatch
from .test_serve import start_serve

URL = "http://127.0.0.1:9477"  # where the default listen (":9477") puts the local daemon
FAKE_SERVER = (Path(__file__).with_name("hostile_http.py")).read_text()
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a virtualenv under /root


@contextmanager
def made_up_api() -> Iterator[str]:
    """A directory every user can read, holding the answers of a healthy-looking daemon."""
    state = ExportState((snapshot(),), (), last_poll=T1, interval=5.0)
    documents = {
        "_api_v1_snapshot": api.snapshot_document(state, api.SnapshotQuery()),
        "_api_v1_findings": api.findings_document(state, None, 1000),
    }
    with tempfile.TemporaryDirectory(prefix="tw-fake-api-") as directory:
        os.chmod(directory, 0o755)
        for name, document in documents.items():
            body = json.dumps(document).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            path = Path(directory) / name
            path.write_bytes(head + body)
            path.chmod(0o644)
        yield directory


def first_line(done: object) -> str:
    assert done.returncode == 0, done.stderr  # type: ignore[attr-defined]
    return done.stdout.splitlines()[0]  # type: ignore[attr-defined,no-any-return]


def wait_listening(ns: Netns, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ":9477 " not in ns.ss("-ltnH") + " ":
        assert time.monotonic() < deadline, "nothing listens on :9477"
        time.sleep(0.2)


def test_top_reads_only_a_local_daemon_it_can_verify(tmp_path: Path) -> None:
    with Netns() as ns, made_up_api() as directory:
        populations.accept_queue_full(ns, 20901)
        check = run_tcpwatch(ns, "check", "--window", "0")
        assert check.returncode == 2 and check.stdout.startswith("TCPWATCH CRITICAL"), check

        fake = ns.spawn(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                         SYSTEM_PYTHON, "-c", FAKE_SERVER, "9477", directory])  # fmt: skip
        assert ns.read_line(fake) == "ready"
        top = run_tcpwatch(ns, "top", "-b")
        assert first_line(top).endswith(" - polling this host"), top.stdout
        assert (
            f"source   the listener at {URL} belongs to uid 65534: not root, not you, not "
            f"tcpwatch.service; --from {URL} reads it anyway: polling this host instead\n"
        ) in top.stdout
        assert "status   CRITICAL - 1 critical" in top.stdout
        # Asked by name, it is read: --from is the operator's word.
        told = run_tcpwatch(ns, "top", "-b", "--from", URL)
        assert (
            first_line(told).endswith(f"from {URL}") and "status   OK - no findings" in told.stdout
        )
        ns.stop(fake)

        as_root = ns.spawn([SYSTEM_PYTHON, "-c", FAKE_SERVER, "9477", directory])
        assert ns.read_line(as_root) == "ready"
        top = run_tcpwatch(ns, "top", "-b")
        pid = int(ns.run("ss", "-ltnHp", "sport = :9477").stdout.split("pid=")[1].split(",")[0])
        assert first_line(top).endswith(" - polling this host"), top.stdout
        assert (
            f"source   the listener at {URL} is python3[{pid}], not tcpwatch; --from {URL} "
            "reads it anyway: polling this host instead\n"
        ) in top.stdout
        assert "status   CRITICAL" in top.stdout
        ns.stop(as_root)

        served = start_serve(ns, tmp_path / "serve.log", "--interval", "1")
        try:
            wait_listening(ns)
            time.sleep(2.5)  # the first polls
            top = run_tcpwatch(ns, "top", "-b")
            assert first_line(top).endswith(
                f"from {URL} (daemon pid {served.process.pid}, uid 0)"
            ), (top.stdout, served.log())
            assert "status   CRITICAL - 1 critical" in top.stdout
        finally:
            served.process.kill()
            served.process.wait(timeout=10)
