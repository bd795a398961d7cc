"""Process attribution and namespace names against the real kernel and ``ss -p``.

Inside a throw-away namespace: a process named with prctl(PR_SET_NAME) holds a listener and
CLOSE_WAIT sockets, and another pair of processes shares two listeners across fork(). The
sockets are dumped with tcpwatch's sock_diag source inside the namespace, attributed with
scan_owners from here (fd links name socket inodes whatever the namespace), and every owner is
compared with what ``ss -tanpe`` prints there.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tcpwatch.paths import ProcPaths
from tcpwatch.sources.netns import current_netns_inode, netns_name
from tcpwatch.sources.processes import scan_owners
from tests.integration import populations
from tests.integration.netns import Netns, SsSocket, parse_ss

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[2])
ENVIRONMENT = {**os.environ, "PYTHONPATH": REPO}
CLOSE_WAITS = 12
CLOSE_WAIT_PORT = 20070

# Holds an IPv4 and an IPv6 listener shared by a parent and its forked child, each renamed. The
# child reports its rename through a pipe, so nobody looks before both names are set.
SHARER = r"""
import ctypes, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def rename(name):
    if libc.prctl(15, name.encode(), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
listeners = []
for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(8)
    listeners.append(listener)
ready_read, ready_write = os.pipe()
kid = os.fork()
if kid == 0:
    rename(sys.argv[2])
    os.write(ready_write, b"x")
    time.sleep(240)
    os._exit(0)
rename(sys.argv[1])
if os.read(ready_read, 1) != b"x":
    raise SystemExit("child did not rename itself")
inodes = [os.fstat(listener.fileno()).st_ino for listener in listeners]
print(json.dumps({"pid": os.getpid(), "kid": kid, "inodes": inodes}), flush=True)
time.sleep(240)
"""

DUMP = """
import json
from tcpwatch.sources.sockets import collect
table = collect(None, None, attribute_states=("close_wait",))
print(json.dumps({
    "listen": sorted(listener.inode for listener in table.listeners),
    "close_wait": sorted(table.inodes_by_state["close_wait"]),
}))
"""

NAME_HERE = """
from tcpwatch.paths import ProcPaths
from tcpwatch.sources.netns import current_netns_inode, netns_name
import os
paths = ProcPaths()
print(os.getpid(), os.readlink("/proc/self/ns/net"), netns_name(paths, current_netns_inode(paths)))
"""


@dataclass(frozen=True, slots=True)
class Scene:
    ns: Netns
    leaker: dict[str, Any]  # populations.close_wait's ready info, plus "name"
    sharer: dict[str, Any]  # SHARER's line, plus "parent_name" and "kid_name"


@pytest.fixture
def scene() -> Iterator[Scene]:
    suffix = secrets.token_hex(2)
    with Netns() as ns:
        leaker_name = f"tw-leaker-{suffix}"  # 14 characters: kept whole
        leaker = populations.close_wait(ns, CLOSE_WAITS, CLOSE_WAIT_PORT, leaker_name)
        parent_name = f"tw-sharing-parent-{suffix}"  # 22 characters: comm keeps 15
        kid_name = f"tw-kid-{suffix}"
        helper = ns.spawn([sys.executable, "-c", SHARER, parent_name, kid_name], lifetime=240)
        sharer = json.loads(ns.read_line(helper, timeout=30))
        yield Scene(
            ns,
            {**leaker.info, "name": leaker_name},
            {**sharer, "parent_name": parent_name, "kid_name": kid_name},
        )


def dump(ns: Netns) -> dict[str, list[int]]:
    result = ns.run(sys.executable, "-c", DUMP, env=ENVIRONMENT, cwd=REPO)
    parsed: dict[str, list[int]] = json.loads(result.stdout)
    return parsed


def test_owners_match_ss(scene: Scene) -> None:
    ours = dump(scene.ns)
    ss_by_inode: dict[int, SsSocket] = {
        sock.inode: sock
        for sock in parse_ss(scene.ns.ss("-tanpeH"), "ss -tanpeH")
        if sock.state in ("listen", "close_wait") and sock.inode is not None
    }
    wanted = frozenset(ours["listen"]) | frozenset(ours["close_wait"])
    # The dump and ss see the same sockets: the leaker's listener and CLOSE_WAITs, 2 shared.
    assert len(ours["close_wait"]) == CLOSE_WAITS
    assert len(ours["listen"]) == 3
    assert set(ss_by_inode) == wanted
    assert sorted(scene.leaker["close_wait_inodes"]) == ours["close_wait"]

    attribution = scan_owners(ProcPaths(), wanted)

    assert attribution.complete
    assert set(attribution.owners) == wanted
    for inode in wanted:
        listed = ss_by_inode[inode].processes
        assert listed, f"ss shows no process for inode {inode}"
        lowest = min(listed, key=lambda process: process.pid)
        owner = attribution.owners[inode]
        assert (owner.pid, owner.name) == (lowest.pid, lowest.name), ss_by_inode[inode]


def test_the_leaker_owns_its_listener_and_close_wait_sockets(scene: Scene) -> None:
    ours = dump(scene.ns)
    leaked = frozenset(ours["close_wait"])
    attribution = scan_owners(ProcPaths(), leaked)
    assert {owner.pid for owner in attribution.owners.values()} == {scene.leaker["pid"]}
    assert {owner.name for owner in attribution.owners.values()} == {scene.leaker["name"]}
    assert len(attribution.owners) == CLOSE_WAITS


def test_a_shared_listener_goes_to_the_lowest_pid_which_ss_lists_last(scene: Scene) -> None:
    parent, kid = scene.sharer["pid"], scene.sharer["kid"]
    names = {parent: scene.sharer["parent_name"][:15], kid: scene.sharer["kid_name"]}
    lowest = min(parent, kid)
    shared = frozenset(scene.sharer["inodes"])
    ss_by_inode = {sock.inode: sock for sock in parse_ss(scene.ns.ss("-tlnpeH"), "ss -tlnpeH")}

    attribution = scan_owners(ProcPaths(), shared)

    for inode in shared:
        listed = [(process.pid, process.name) for process in ss_by_inode[inode].processes]
        assert listed == sorted(names.items(), reverse=True)  # ss: highest pid first
        assert attribution.owners[inode].pid == lowest
        assert attribution.owners[inode].name == names[lowest]
    assert names[parent] == "tw-sharing-pare"  # the kernel's comm keeps 15 characters


def test_the_scan_stops_early_once_everything_is_found(scene: Scene) -> None:
    # The scene's namespace is read first (as the pipeline asks, the sockets' namespace) and the
    # walk stops once it has the leaker's sockets: none of the host's other processes is read.
    # Inode 0 (TIME_WAIT, request sockets) and inode 1 (no socket has it) are never found, so
    # that scan reads every process. (Within the namespace the smaller fd tables come first,
    # so the sharer and its child may be read before the leaker: fdwalk.py.)
    netns = frozenset({os.stat(f"/run/netns/{scene.ns.name}").st_ino})
    leaked = frozenset(scene.leaker["close_wait_inodes"])
    early = scan_owners(ProcPaths(), leaked, netns_inodes=netns)
    full = scan_owners(ProcPaths(), frozenset({0, 1}), netns_inodes=netns)
    assert early.complete
    assert len(early.owners) == CLOSE_WAITS
    assert full.owners == {}
    assert early.processes_scanned <= len(scene.ns.pids())
    assert early.processes_scanned + 2 <= full.processes_scanned


def test_netns_name_on_the_host() -> None:
    paths = ProcPaths()
    assert netns_name(paths, current_netns_inode(paths)) == "host"


def test_netns_name_inside_an_ip_netns_namespace() -> None:
    with Netns() as ns:
        result = ns.run(sys.executable, "-c", NAME_HERE, env=ENVIRONMENT, cwd=REPO)
        pid, _, name = result.stdout.split()
        assert name == ns.name
        assert int(pid) > 0


def test_netns_name_inside_an_unnamed_namespace() -> None:
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", NAME_HERE],
        env=ENVIRONMENT,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    _, link, name = result.stdout.split()
    # The kernel's net:[INODE], without brackets; not the pid of its only process (unshare
    # exec()s the command), which a restart would change.
    assert link.startswith("net:[") and name == f"ns:{link[5:-1]}"
