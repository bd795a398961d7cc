"""One-off lookups for `tcpwatch top`: the listeners on a port and the processes holding them.

Not a source of the poll: `top` asks these before it decides whether the daemon answering on the
local listen address may be trusted (tcpwatch/top/local.py). They live here, beside the other
kernel readers, so nothing outside sources/ reads sock_diag or /proc/PID/fd itself.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from tcpwatch.paths import ProcPaths
from tcpwatch.sources import netlink
from tcpwatch.sources.fdwalk import socket_links, wanted_sockets_in
from tcpwatch.sources.netlink import SockDiagError

__all__ = ["SockDiagError"]

UNIT = "tcpwatch.service"  # the system unit whose dynamic user may hold the daemon's listener
TCP_LISTEN = 10
_LISTEN_MASK = 1 << TCP_LISTEN
_MESSAGE = struct.Struct("=IHHII")  # nlmsghdr
_SPORT = struct.Struct("!H")
_UID_INODE = struct.Struct("=II")  # inet_diag_msg idiag_uid, idiag_inode at offset 80
_ADDRESS_BYTES = {"ipv4": 4, "ipv6": 16}
MAX_PROCESSES = 100_000  # /proc entries looked at, at most, to find a listener's process


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    family: str
    address: str
    port: int
    uid: int
    inode: int


@dataclass(frozen=True, slots=True)
class Holder:
    """The process holding a listening socket, as /proc shows it."""

    pid: int
    name: str
    is_tcpwatch: bool


def listening_sockets(port: int) -> list[ListeningSocket]:
    """Every TCP listener of this network namespace on ``port``, from a sock_diag dump."""
    found: list[ListeningSocket] = []
    with netlink.open_socket() as sock:
        for family in ("ipv4", "ipv6"):
            sock.send(netlink.build_request(family, _LISTEN_MASK))
            found += [s for s in _read_dump(sock, family) if s.port == port]
    return found


def _read_dump(sock: socket.socket, family: str) -> Iterable[ListeningSocket]:
    width = _ADDRESS_BYTES[family]
    while True:
        data = sock.recv(65536)
        if not data:
            raise netlink.SockDiagError("netlink socket closed before the dump ended")
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _, _, _ = _MESSAGE.unpack_from(data, offset)
            if kind == netlink.NLMSG_DONE:
                return
            if kind == netlink.NLMSG_ERROR:
                (code,) = netlink.ERRNO_FIELD.unpack_from(data, offset + 16)
                raise netlink.SockDiagError(f"sock_diag dump failed: {os.strerror(-code)}")
            if length < 88 or offset + length > len(data):
                raise netlink.SockDiagError("malformed sock_diag message")
            raw = data[offset + 24 : offset + 24 + width]
            (port,) = _SPORT.unpack_from(data, offset + 20)
            uid, inode = _UID_INODE.unpack_from(data, offset + 80)
            address = str(ipaddress.ip_address(raw))
            yield ListeningSocket(family, address, port, uid, inode)
            offset += (length + 3) & ~3


def unit_uids(paths: ProcPaths, unit: str = UNIT) -> set[int]:
    """The uids of the processes of the system unit ``unit``: those whose cgroup is exactly
    /system.slice/<unit> (cgroup v2, or v1's name=systemd hierarchy). A user's own unit of the
    same name lives under /user.slice and does not count: any user can start one."""
    wanted = f"/system.slice/{unit}"
    uids: set[int] = set()
    for pid in _pids(paths):
        try:
            with open(paths.pid(pid, "cgroup"), encoding="utf-8", errors="replace") as file:
                groups = [line.rstrip("\n").split(":", 2) for line in file]
            if not any(
                group[2] == wanted and group[1] in ("", "name=systemd")
                for group in groups
                if len(group) == 3
            ):
                continue
            with open(paths.pid(pid, "status"), encoding="utf-8", errors="replace") as file:
                for line in file:
                    if line.startswith("Uid:"):
                        uids.add(int(line.split()[1]))  # the real uid
        except (OSError, ValueError, IndexError):
            continue  # gone, or not readable: not evidence either way
    return uids


def holders(paths: ProcPaths, inodes: Collection[int]) -> dict[int, Holder]:
    """Socket inode -> the process holding it, for the processes whose fds we may read."""
    found: dict[int, Holder] = {}
    wanted = set(inodes)
    for pid in _pids(paths):
        if not wanted - set(found):
            break
        try:
            held = wanted_sockets_in(paths.pid(pid, "fd"), socket_links(wanted))
        except OSError:
            continue  # another user's process (no CAP_SYS_PTRACE), or gone
        for inode, _ in held:
            found[inode] = _holder(paths, pid)
    return found


def claimed_holders(paths: ProcPaths, claims: Mapping[int, tuple[int, str]]) -> dict[int, Holder]:
    """Socket inode -> its holder, for the claims (inode -> (pid, fd)) that hold: one readlink
    of /proc/PID/fd/FD each, which must be ``socket:[INODE]`` (an inode names one socket while it
    lives). A claim that fails is left out: whoever made it is not believed."""
    found: dict[int, Holder] = {}
    for inode, (pid, fd) in claims.items():
        try:
            if os.readlink(paths.pid(pid, "fd", fd)) == f"socket:[{inode}]":
                found[inode] = _holder(paths, pid)
        except OSError:
            continue  # gone, not ours to read, or no such descriptor
    return found


def _holder(paths: ProcPaths, pid: int) -> Holder:
    try:
        with open(paths.pid(pid, "cmdline"), "rb") as file:
            argv = file.read(4096).split(b"\0")
        with open(paths.pid(pid, "comm"), "rb") as file:
            name = file.read(64).rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return Holder(pid, "?", False)
    return Holder(pid, name, is_tcpwatch_command(argv))


def is_tcpwatch_command(argv: list[bytes]) -> bool:
    """``tcpwatch serve``, ``/usr/bin/python3 /usr/bin/tcpwatch serve``, ``python -m tcpwatch``."""
    words = [os.path.basename(word) for word in argv[:4]]
    if b"tcpwatch" in words:
        return True
    return any(pair == (b"-m", b"tcpwatch") for pair in itertools.pairwise(argv))


def _pids(paths: ProcPaths) -> list[int]:
    return sorted(paths.list_pids())[:MAX_PROCESSES]
