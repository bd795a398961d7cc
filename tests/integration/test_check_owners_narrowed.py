"""check looks only for the owners its rules read (tcpwatch/owner_needs.py), against the kernel.

Inside a throw-away namespace: a process leaking CLOSE_WAIT sockets (below S01's threshold of 50,
then above it), and a holder that opens thousands of pipes before its listener, so its listener
sits at a high descriptor and the walk must read far into its table (and may stop there). One
poll with the narrowed lookup and one with the full one (every listener's and CLOSE_WAIT
socket's owner, as before) run in the namespace: their findings must be the same, every owner
the narrowed one found must be the one ``ss -tanpe`` lists (the lowest pid), and the CLOSE_WAIT
owners are looked for only when S01 can fire.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration import populations
from tests.integration.netns import Netns, parse_ss, run_tcpwatch

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
ENVIRONMENT = {**os.environ, "PYTHONPATH": REPO}
LEAK_PORT = 20081
PIPES = 1500  # 3,000 descriptors before the holder's listener

# Opens PIPES pipes, then a listener: the listener's descriptor is above 3,000.
HOLDER = r"""
import ctypes, json, os, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if ctypes.CDLL(None, use_errno=True).prctl(15, sys.argv[1].encode(), 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
pipes = [os.pipe() for _ in range(int(sys.argv[2]))]
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
print(json.dumps({"pid": os.getpid(), "fd": listener.fileno(),
                  "inode": os.fstat(listener.fileno()).st_ino}), flush=True)
time.sleep(240)
"""

# One poll with the narrowed lookup (check's), one with every candidate's owner (as before).
COMPARE = r"""
import json
from tcpwatch.config import Config
from tcpwatch.pipeline import Pipeline

def poll(narrow):
    pipeline = Pipeline(long_lived=False, cached=False, log_failures=False,
                        owners_for_findings=narrow)
    try:
        state = pipeline.poll(Config(check_window=0.0))
    finally:
        pipeline.close()
    (snapshot,) = state.snapshots
    return {
        "findings": [[f.rule_id, f.severity, f.title, f.subject,
                      {key: str(value) for key, value in f.evidence.items()}, f.remediation]
                     for f in state.findings],
        "owners": {str(inode): [o.pid, o.name] for inode, o in snapshot.attribution.owners.items()},
        "complete": snapshot.attribution.complete,
    }

print(json.dumps({"narrow": poll(True), "full": poll(False)}))
"""


def compared(ns: Netns) -> dict[str, Any]:
    result = ns.run(sys.executable, "-c", COMPARE, env=ENVIRONMENT, cwd=REPO, timeout=120)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@pytest.mark.parametrize("leaked", [12, 60])
def test_the_narrowed_lookup_names_the_owners_the_full_walk_names(leaked: int) -> None:
    suffix = secrets.token_hex(2)
    leaker_name, holder_name = f"tw-leak-{suffix}", f"tw-hold-{suffix}"
    with Netns() as ns:
        leak = populations.close_wait(ns, leaked, LEAK_PORT, leaker_name)
        holder = ns.spawn([sys.executable, "-c", HOLDER, holder_name, str(PIPES)], lifetime=240)
        held = json.loads(ns.read_line(holder, timeout=60))
        assert held["fd"] > 2 * PIPES  # the listener sits far into the holder's table

        answer = compared(ns)
        ss = {
            sock.inode: sock
            for sock in parse_ss(ns.ss("-tanpeH"), "ss -tanpeH")
            if sock.inode is not None
        }

    narrow, full = answer["narrow"], answer["full"]
    assert narrow["findings"] == full["findings"]
    assert narrow["complete"] and full["complete"]
    owners = {int(inode): tuple(owner) for inode, owner in narrow["owners"].items()}
    for inode, owner in owners.items():
        assert tuple(full["owners"][str(inode)]) == owner
        lowest = min(ss[inode].processes, key=lambda process: process.pid)
        assert owner == (lowest.pid, lowest.name), ss[inode]
    listeners = {inode for inode, sock in ss.items() if sock.state == "listen"}
    close_wait = set(leak.info["close_wait_inodes"])
    assert owners[held["inode"]] == (held["pid"], holder_name)
    assert listeners <= set(owners)  # Q05 judges every listener's owner
    rules = [finding[0] for finding in narrow["findings"]]
    if leaked < 50:
        # S01 cannot fire: no CLOSE_WAIT owner is looked for (the full walk finds them all).
        assert "S01" not in rules
        assert not close_wait & set(owners)
        assert close_wait <= {int(inode) for inode in full["owners"]}
    else:
        assert rules.count("S01") == 1
        assert close_wait <= set(owners)
        assert {owners[inode] for inode in close_wait} == {(leak.info["pid"], leaker_name)}


def test_check_names_the_leaking_process() -> None:
    # The command as a user runs it: its S01 names the leaker, whose owner it found.
    name = f"tw-leak-{secrets.token_hex(2)}"
    with Netns() as ns:
        leak = populations.close_wait(ns, 55, LEAK_PORT, name)
        result = run_tcpwatch(ns, "check", "--window", "0", "--format", "json")
    report = json.loads(result.stdout)
    (s01,) = [f for f in report["findings"] if f["id"] == "S01"]
    assert s01["evidence"]["pid"] == leak.info["pid"]
    assert s01["evidence"]["process"] == name
    assert s01["evidence"]["close_wait_sockets"] == 55
