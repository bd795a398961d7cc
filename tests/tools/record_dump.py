"""Record real NETLINK_SOCK_DIAG dumps into fixture files for the sockdiag unit tests.

File format (``*.bin``): the datagrams exactly as recv() returned them, each preceded by its
length as a 4-byte little-endian unsigned integer. The last datagram holds NLMSG_DONE.
Datagram contents are the kernel's, in host byte order (little-endian x86-64 here).

Usage, as root:

    # one dump of the current namespace's sockets
    python tests/tools/record_dump.py dump --family ipv4 --states no-established OUT.bin

    # build the known "mixed" population in a fresh namespace, record every dump the source
    # makes plus `ss -tanHe` and sockstat, then remove the namespace
    python tests/tools/record_dump.py population tests/fixtures/netlink

The population is described in tests/fixtures/netlink/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tcpwatch.sources.netlink import (  # noqa: E402  (needs the repository on sys.path)
    NETLINK_SOCK_DIAG,
    NLMSG_DONE,
    NLMSG_ERROR,
    build_request,
    port_range_bytecode,
)
from tcpwatch.sources.sockdiag import (  # noqa: E402
    ALL_STATES_MASK,
    ESTABLISHED_MASK,
    Receiver,
)

FRAME = struct.Struct("<I")
STATE_MASKS = {
    "all": ALL_STATES_MASK,
    "no-established": ALL_STATES_MASK & ~ESTABLISHED_MASK,
    "established": ESTABLISHED_MASK,
}
PORT_RANGE = (32768, 60999)  # the namespace's default ip_local_port_range
MAX_DATAGRAMS = 10_000

# Pure ACKs to 5001, 5004 and 5005 are dropped, so their request sockets stay in SYN_RECV; SYNs
# to 5009 vanish, so connects there stay in SYN_SENT.
NFT_RULES = """
table inet record_dump {
    chain input {
        type filter hook input priority 0;
        tcp dport { 5001, 5004, 5005 } tcp flags & (syn | ack | fin | rst) == ack drop
        tcp dport 5009 tcp flags & (syn | ack) == syn drop
    }
}
"""


def write_frames(path: Path, datagrams: list[bytes]) -> None:
    with open(path, "wb") as out:
        for datagram in datagrams:
            out.write(FRAME.pack(len(datagram)))
            out.write(datagram)


def recorded_receiver(datagrams: Iterable[bytes]) -> Receiver:
    """A receiver (as run_dump takes) replaying recorded datagrams, for tests."""
    pending: Iterator[bytes] = iter(datagrams)

    def receive(buffer: memoryview) -> int:
        chunk = next(pending, b"")
        buffer[: len(chunk)] = chunk
        return len(chunk)

    return receive


def state_mask(states: Iterable[int]) -> int:
    """The inet_diag state bitmask of kernel TCP state numbers."""
    mask = 0
    for number in states:
        mask |= 1 << number
    return mask


def read_frames(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = FRAME.unpack_from(data, offset)
        offset += FRAME.size
        yield data[offset : offset + length]
        offset += length


def _finished(datagram: bytes) -> bool:
    offset = 0
    while offset + 16 <= len(datagram):
        length, kind = struct.unpack_from("=IH", datagram, offset)
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return True
        if length < 16:
            raise ValueError(f"bad netlink length {length}")
        offset += (length + 3) & ~3
    return False


def record(family: str, states: str, port_range: tuple[int, int] | None) -> list[bytes]:
    """One dump in the current namespace: the raw datagrams, NLMSG_DONE included."""
    bytecode = port_range_bytecode(*port_range) if port_range else b""
    request = build_request(family, STATE_MASKS[states], bytecode, sequence=1)
    datagrams: list[bytes] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.bind((0, 0))
        sock.settimeout(10)
        sock.send(request)
        while len(datagrams) < MAX_DATAGRAMS:
            datagram = sock.recv(1 << 17)
            datagrams.append(datagram)
            if _finished(datagram):
                return datagrams
    raise RuntimeError(f"dump did not end within {MAX_DATAGRAMS} datagrams")


def _sockstat_inuse() -> dict[str, int]:
    inuse = {}
    for family, name, tag in (("ipv4", "sockstat", "TCP:"), ("ipv6", "sockstat6", "TCP6:")):
        for line in Path("/proc/net", name).read_text().splitlines():
            if line.startswith(tag):
                words = line.split()
                inuse[family] = int(words[words.index("inuse") + 1])
    return inuse


# The dumps tcpwatch makes (see sockets.collect), and the full one `dump_established` makes.
DUMPS = (
    ("ipv4", "all", None),
    ("ipv6", "all", None),
    ("ipv4", "no-established", None),
    ("ipv6", "no-established", None),
    ("ipv4", "established", PORT_RANGE),
    ("ipv6", "established", PORT_RANGE),
)


def record_all(directory: Path, name: str) -> dict[str, object]:
    """Inside the namespace: every dump of DUMPS, with sockstat read just before and after."""
    before = _sockstat_inuse()
    files = {}
    for family, states, port_range in DUMPS:
        suffix = "-ephemeral" if port_range else ""
        file_name = f"{name}-{family}-{states}{suffix}.bin"
        write_frames(directory / file_name, record(family, states, port_range))
        files[file_name] = {"family": family, "states": states, "port_range": port_range}
    after = _sockstat_inuse()
    if before != after:
        raise RuntimeError(f"sockstat moved during the recording: {before} -> {after}")
    return {"files": files, "sockstat_inuse": before, "port_range": PORT_RANGE}


# -- the "mixed" population ----------------------------------------------------------------------


def _listener(
    keep: list[socket.socket],
    family: socket.AddressFamily,
    address: str,
    port: int,
    backlog: int,
    v6only: bool | None = None,
    reuseport: bool = False,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((address, port))
    sock.listen(backlog)
    keep.append(sock)
    return sock


def _connect(
    keep: list[socket.socket],
    family: socket.AddressFamily,
    address: str,
    port: int,
    blocking: bool = True,
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if blocking:
        sock.connect((address, port))
    else:
        sock.setblocking(False)
        sock.connect_ex((address, port))
    keep.append(sock)
    return sock


def _accept(keep: list[socket.socket], listener: socket.socket) -> socket.socket:
    listener.settimeout(5)
    server, _ = listener.accept()
    keep.append(server)
    return server


def build_mixed(keep: list[socket.socket]) -> None:
    """The population of README.md, section "mixed". Ports below the ephemeral range except
    40000 (a listener inside it) and 45000 (a self-connected socket)."""
    v4, v6 = socket.AF_INET, socket.AF_INET6
    # 0.0.0.0:5000: 3 accepted pairs, 2 clients closed first (TIME_WAIT), 2 left in the queue.
    l5000 = _listener(keep, v4, "0.0.0.0", 5000, 16)
    for _ in range(3):
        _connect(keep, v4, "127.0.0.1", 5000)
        _accept(keep, l5000)
    for _ in range(2):
        client = _connect(keep, v4, "127.0.0.1", 5000)
        server = _accept(keep, l5000)
        client.close()
        server.settimeout(5)
        if server.recv(1) != b"":
            raise RuntimeError("expected EOF")
        server.close()
    for _ in range(2):
        _connect(keep, v4, "127.0.0.1", 5000)
    # [::]:5001 dual-stack, final ACKs dropped: 3 IPv4 and 2 IPv6 request sockets.
    _listener(keep, v6, "::", 5001, 32, v6only=False)
    for _ in range(3):
        _connect(keep, v4, "127.0.0.1", 5001, blocking=False)
    for _ in range(2):
        _connect(keep, v6, "::1", 5001, blocking=False)
    # SO_REUSEPORT pair on 127.0.0.1:5002: 4 connections, all accepted by whichever got them.
    group = [_listener(keep, v4, "127.0.0.1", 5002, 8, reuseport=True) for _ in range(2)]
    for _ in range(4):
        _connect(keep, v4, "127.0.0.1", 5002)
    accepted = 0
    deadline = time.monotonic() + 5
    while accepted < 4 and time.monotonic() < deadline:
        ready, _, _ = select.select(group, [], [], 0.5)
        for listener in ready:
            _accept(keep, listener)
            accepted += 1
    if accepted != 4:
        raise RuntimeError(f"accepted {accepted} of 4 reuseport connections")
    # [::1]:5003 IPv6 only: 2 pairs; a client that shut down its side (FIN_WAIT2, full socket)
    # and one that closed (orphan FIN_WAIT2, a timewait socket); both servers in CLOSE_WAIT.
    l5003 = _listener(keep, v6, "::1", 5003, 8, v6only=True)
    for _ in range(2):
        _connect(keep, v6, "::1", 5003)
        _accept(keep, l5003)
    half = _connect(keep, v6, "::1", 5003)
    _accept(keep, l5003)
    half.shutdown(socket.SHUT_WR)
    gone = _connect(keep, v6, "::1", 5003)
    _accept(keep, l5003)
    keep.remove(gone)
    gone.close()
    # 0.0.0.0:5004 with 2 request sockets; a SO_REUSEPORT pair on 127.0.0.1:5005 with 3.
    _listener(keep, v4, "0.0.0.0", 5004, 16)
    for _ in range(2):
        _connect(keep, v4, "127.0.0.1", 5004, blocking=False)
    for _ in range(2):
        _listener(keep, v4, "127.0.0.1", 5005, 16, reuseport=True)
    for _ in range(3):
        _connect(keep, v4, "127.0.0.1", 5005, blocking=False)
    # 127.0.0.1:5006 with backlog 2 and 3 connections never accepted: Recv-Q reads max + 1.
    _listener(keep, v4, "127.0.0.1", 5006, 2)
    for _ in range(3):
        _connect(keep, v4, "127.0.0.1", 5006)
    # SYNs to 5009 are dropped: 2 sockets in SYN_SENT.
    for _ in range(2):
        _connect(keep, v4, "127.0.0.1", 5009, blocking=False)
    # A listener inside the ephemeral range with one pair: its accepted side is not ephemeral.
    l40000 = _listener(keep, v4, "127.0.0.1", 40000, 8)
    _connect(keep, v4, "127.0.0.1", 40000)
    _accept(keep, l40000)
    # A socket connected to itself (simultaneous open).
    self_connected = socket.socket(v4, socket.SOCK_STREAM)
    self_connected.bind(("127.0.0.1", 45000))
    self_connected.connect(("127.0.0.1", 45000))
    keep.append(self_connected)


def hold(lifetime: float) -> None:
    """Inside the namespace: build the population, say "ready", keep it until stdin closes."""
    keep: list[socket.socket] = []
    build_mixed(keep)
    print("ready", flush=True)
    select.select([sys.stdin], [], [], lifetime)


def _ns(name: str, *argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", name, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{argv!r} in {name} exited {result.returncode}: {result.stderr}")
    return result.stdout


def _settled(name: str) -> str:
    """`ss -tanHe` once the closes are done and two reads agree (timers left out)."""
    deadline = time.monotonic() + 15
    previous = None
    while time.monotonic() < deadline:
        text = _ns(name, "ss", "-tanHe")
        states = [line.split()[0] for line in text.splitlines()]
        shape = sorted(" ".join(line.split()[:5]) for line in text.splitlines())
        if (
            states.count("TIME-WAIT") == 2
            and states.count("SYN-RECV") == 10
            and "LAST-ACK" not in states
            and "FIN-WAIT-1" not in states
            and shape == previous
        ):
            return text
        previous = shape
        time.sleep(0.1)
    raise RuntimeError(f"population did not settle:\n{text}")


def population(directory: Path, name: str) -> None:
    netns = f"tw-rec-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    holder: subprocess.Popen[str] | None = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=30)
        _ns(netns, "nft", "-f", "-", stdin=NFT_RULES)
        holder = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, __file__, "hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], 30)
        if not ready or holder.stdout.readline().strip() != "ready":
            raise RuntimeError("the population holder did not get ready")
        ss_before = _settled(netns)
        out = _ns(netns, sys.executable, __file__, "record-all", str(directory), name)
        ss_after = _ns(netns, "ss", "-tanHe")
        shape = sorted(" ".join(line.split()[:5]) for line in ss_before.splitlines())
        if shape != sorted(" ".join(line.split()[:5]) for line in ss_after.splitlines()):
            raise RuntimeError(f"sockets changed during the recording:\n{ss_before}\n{ss_after}")
        (directory / f"{name}.ss").write_text(_stripped(_ns(netns, "ss", "-tan")))
        (directory / f"{name}.ss-e").write_text(_stripped(ss_before))
        (directory / f"{name}.json").write_text(out)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(timeout=10)
        for pid in _pids(netns):
            os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", netns], check=True, timeout=30)


def _stripped(text: str) -> str:
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def _pids(netns: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30, check=False
    )
    return [int(word) for word in result.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("dump", help="record one dump of the current namespace")
    one.add_argument("--family", choices=("ipv4", "ipv6"), required=True)
    one.add_argument("--states", choices=tuple(STATE_MASKS), required=True)
    one.add_argument("--port-range", help="LOW-HIGH: add the local-port bytecode filter")
    one.add_argument("output", type=Path)
    every = commands.add_parser("record-all", help="(inside a namespace) record every dump")
    every.add_argument("directory", type=Path)
    every.add_argument("name")
    commands.add_parser("hold", help="(inside a namespace) build and hold the population")
    build = commands.add_parser("population", help="record the mixed population's dumps")
    build.add_argument("directory", type=Path)
    build.add_argument("--name", default="mixed")
    args = parser.parse_args()
    if args.command == "dump":
        port_range = None
        if args.port_range:
            low, _, high = args.port_range.partition("-")
            port_range = (int(low), int(high))
        write_frames(args.output, record(args.family, args.states, port_range))
    elif args.command == "record-all":
        json.dump(record_all(args.directory, args.name), sys.stdout, indent=2)
    elif args.command == "hold":
        hold(lifetime=120)
    else:
        args.directory.mkdir(parents=True, exist_ok=True)
        population(args.directory.resolve(), args.name)


if __name__ == "__main__":
    main()
