"""The netlink side of sock_diag: constants, requests, attribute walking and the socket.

Shared by the socket dumps (sockdiag.py) and the socket-destroy subscription (lifecycle.py).
"""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2  # attribute: struct tcp_info (tcpinfo.py); idiag_ext bit 1 << (2 - 1) asks it
INET_DIAG_PROTOCOL = 10  # attribute: u8 IPPROTO_*, on destroy messages
INFO_EXTENSION = 1 << (INET_DIAG_INFO - 1)
# attribute: u32 sk_meminfo[SK_MEMINFO_VARS] (`ss -m` skmem:(r..,d..)); index 8 is sk_drops
INET_DIAG_SKMEMINFO = 7
SKMEMINFO_EXTENSION = 1 << (INET_DIAG_SKMEMINFO - 1)
SK_MEMINFO_DROPS = 8
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3

# Kernel TCP state numbers (include/net/tcp_states.h).

_NLMSGHDR = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBxI")  # inet_diag_req_v2 head; the 48-byte sockid follows
NLMSG_HEAD = struct.Struct("=IH")
NLATTR = struct.Struct("=HH")

ERRNO_FIELD = struct.Struct("=i")
FAMILY_NUMBER = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


class SockDiagError(Exception):
    """The dump failed or returned something we cannot parse."""


def port_range_bytecode(low: int, high: int) -> bytes:
    """inet_diag bytecode accepting sockets whose local port is in [low, high].

    Each op is {code u8, yes u8, no u16}; a jump landing exactly at the end accepts, one landing
    4 bytes past it rejects. The port operand travels in the ``no`` field of the following op.
    """
    program_length = 16
    return b"".join(
        (
            struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, program_length + 4),
            struct.pack("=BBH", 0, 0, low),
            struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, 8 + 4),
            struct.pack("=BBH", 0, 0, high),
        )
    )


def build_request(
    family: str, states: int, bytecode: bytes = b"", sequence: int = 1, extensions: int = 0
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request; ``extensions`` is idiag_ext (e.g. INFO_EXTENSION)."""
    body = _REQUEST.pack(FAMILY_NUMBER[family], socket.IPPROTO_TCP, extensions, states)
    body += bytes(48)
    if bytecode:
        attr_len = 4 + len(bytecode)
        body += NLATTR.pack(attr_len, INET_DIAG_REQ_BYTECODE) + bytecode
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, flags, sequence, 0) + body


def has_attribute(data: memoryview | bytes, start: int, end: int, wanted: int) -> bool:
    return find_attribute(data, start, end, wanted) is not None


def find_attribute(
    data: memoryview | bytes, start: int, end: int, wanted: int
) -> tuple[int, int] | None:
    """(payload offset, payload length) of the first attribute of type ``wanted`` in [start, end).

    A malformed attribute (length < 4 or past ``end``) ends the walk: None.
    """
    while start + 4 <= end:
        length, kind = NLATTR.unpack_from(data, start)
        if length < 4 or start + length > end:
            return None
        if kind & 0x3FFF == wanted:
            return start + 4, length - 4
        start += (length + 3) & ~3
    return None


def open_socket() -> socket.socket:
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        )
    except (OSError, AttributeError) as error:
        raise SockDiagError(f"cannot open a NETLINK_SOCK_DIAG socket: {error}") from error
    sock.bind((0, 0))
    return sock
