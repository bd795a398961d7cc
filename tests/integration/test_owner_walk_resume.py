"""An owner walk cut by collect.process_scan_timeout resumes at the next poll, on the real kernel.

Inside a throw-away namespace, helper processes each hold thousands of fds (dups of /dev/null)
and, after them, two listeners: one walk of their fd tables takes far longer than the 0.1 s
process_scan_timeout set through the configuration. Serve's SnapshotTaker then polls inside the
namespace, each poll resuming the walk the last one cut, until every listener has an owner;
the owners are compared with ``ss -tlnpH`` there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.netns import Netns, parse_ss

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
ENVIRONMENT = {**os.environ, "PYTHONPATH": REPO}
HELPERS = 10
FILLER_FDS = 15_000  # per helper (under a 20,000 fd limit): 150,000 links to read, not 0.1 s
MAX_POLLS = 40

HOLDER = r"""
import json, os, resource, socket, sys, time
fillers = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < fillers + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (fillers + 64, hard))
null = os.open("/dev/null", os.O_RDONLY)
kept = [os.dup(null) for _ in range(fillers)]  # lower fds: read before the sockets
listeners = []
for _ in range(2):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listeners.append(listener)
inodes = [os.fstat(listener.fileno()).st_ino for listener in listeners]
print(json.dumps({"pid": os.getpid(), "inodes": inodes}), flush=True)
time.sleep(300)
"""

POLLS = """
import json, sys
from tcpwatch.config import parse_config
from tcpwatch.pipeline import SnapshotTaker
config = parse_config("collect:\\n  process_scan_timeout: 0.1\\n", "test")
take = SnapshotTaker()
for _ in range(int(sys.argv[1])):
    (snapshot,) = take(config)
    attribution = snapshot.attribution
    owners = {str(inode): [owner.pid, owner.name] for inode, owner in attribution.owners.items()}
    print(json.dumps({"complete": attribution.complete,
                      "scanned": attribution.processes_scanned,
                      "owners": owners}), flush=True)
    if attribution.complete:
        break
"""


def test_a_cut_owner_walk_resumes_until_every_owner_matches_ss() -> None:
    with Netns() as ns:
        holders = [
            ns.spawn([sys.executable, "-c", HOLDER, str(FILLER_FDS)], lifetime=300)
            for _ in range(HELPERS)
        ]
        held: dict[int, int] = {}  # listener inode -> its helper's pid
        for holder in holders:
            line = json.loads(ns.read_line(holder, timeout=60))
            held.update({inode: line["pid"] for inode in line["inodes"]})
        members = len(ns.pids())  # the helpers and their `timeout` wrappers

        result = ns.run(
            sys.executable, "-c", POLLS, str(MAX_POLLS), env=ENVIRONMENT, cwd=REPO, timeout=240
        )
        polls = [json.loads(line) for line in result.stdout.splitlines()]
        ss_owners = {
            sock.inode: sorted(process.pid for process in sock.processes)
            for sock in parse_ss(ns.ss("-tlnpeH"), "ss -tlnpeH")
        }

    assert set(ss_owners) == set(held)  # ss sees the helpers' listeners, and nothing else
    assert all(ss_owners[inode] == [pid] for inode, pid in held.items())
    # The first walk is cut: 0.1 s is far from enough for the helpers' fd tables...
    assert not polls[0]["complete"]
    assert len(polls[0]["owners"]) < len(held)
    # ... and the following ones carry on from it until every owner is found.
    last = polls[-1]
    assert last["complete"], f"not complete after {len(polls)} polls"
    assert {int(inode): owner[0] for inode, owner in last["owners"].items()} == held
    # Together the walks read each process of the namespace (and the poller) once, not once a
    # poll: without the resume, every walk re-read the first helpers and never found the rest.
    walked = sum(poll["scanned"] for poll in polls)
    assert walked <= members + 1, (members, polls)
