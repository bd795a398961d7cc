"""The netlink side of sock_diag: constants, requests, attribute walking, the messages that are
not sockets, counting a dump, and the socket.

Shared by the socket dumps (sockdiag.py) and the socket-destroy subscription (lifecycle.py).
"""

from __future__ import annotations

import errno
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
# The pre-3.3 request (struct inet_diag_req), still served: the kernel runs it with family
# AF_UNSPEC, so one walk of the hash tables answers for IPv4 and IPv6 (a v2 request walks them
# once per family). Its answers are inet_diag messages of its own type (18).
TCPDIAG_GETSOCK = 18
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
_BOTH_REQUEST = struct.Struct(
    "=BBBB48xII"
)  # inet_diag_req: family, 2 lengths, ext, id, states, dbs
NLMSG_HEAD = struct.Struct("=IH")
NLATTR = struct.Struct("=HH")

ERRNO_FIELD = struct.Struct("=i")
FAMILY_NUMBER = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


INET_DIAG_MSG_MIN = 88  # nlmsghdr + inet_diag_msg
TCP_SYN_RECV = 3
TCP_NEW_SYN_RECV = 12
FAMILY_NAME: dict[int, str] = {int(number): name for name, number in FAMILY_NUMBER.items()}


class SockDiagError(Exception):
    """The dump failed or returned something we cannot parse."""


class DumpRefused(SockDiagError):
    """The kernel answered a dump request with an error instead of sockets (NLMSG_ERROR)."""


def unusual_message(
    data: memoryview | bytes,
    offset: int,
    msg_len: int,
    msg_type: int,
    length: int,
    answer: int = SOCK_DIAG_BY_FAMILY,
) -> None:
    """Everything but an inet_diag message of type ``answer``: DONE returns, the rest raises
    (off the hot path)."""
    if msg_len < 16 or offset + msg_len > length:
        raise SockDiagError(f"bad netlink message length {msg_len} at byte {offset} of {length}")
    if msg_type == NLMSG_DONE:
        # A dump that failed part-way ends with DONE carrying a negative errno.
        if msg_len >= 20 and (code := -ERRNO_FIELD.unpack_from(data, offset + 16)[0]) > 0:
            name = errno.errorcode.get(code, str(code))
            raise SockDiagError(f"kernel ended the dump with {name}")
        return
    if msg_type == NLMSG_ERROR:
        code = -ERRNO_FIELD.unpack_from(data, offset + 16)[0] if msg_len >= 20 else 0
        name = errno.errorcode.get(code, str(code))
        raise DumpRefused(f"kernel answered the dump with {name}")
    if msg_len < INET_DIAG_MSG_MIN:
        raise SockDiagError(f"inet_diag message of {msg_len} bytes at byte {offset}")
    if msg_type != answer:
        raise SockDiagError(f"unexpected netlink message type {msg_type} at byte {offset}")
    raise SockDiagError(f"unknown TCP state {data[offset + 17]} at byte {offset}")


def family_of(number: int, asked: str | None, offset: int) -> str:
    """The family name of a message's ``idiag_family``; one the dump did not ask for raises."""
    name = FAMILY_NAME.get(number)
    if name is None or (asked is not None and name != asked):
        raise SockDiagError(f"unexpected address family {number} at byte {offset}")
    return name


class StateCounter:
    """Counts the sockets of a dump by family and state, and nothing else: the ESTABLISHED walk
    under churn (sockets.collect) wants one number per family, so each message costs a header
    and two bytes. Fed like sockdiag.DumpAggregator (``family`` None: both, per message)."""

    def __init__(self) -> None:
        self.states = {name: [0] * 13 for name in FAMILY_NUMBER}
        self.messages = 0

    def feed(self, data: memoryview | bytes, length: int, family: str | None) -> bool:
        header = NLMSG_HEAD.unpack_from
        answer = SOCK_DIAG_BY_FAMILY if family is not None else TCPDIAG_GETSOCK
        by_family = self.states
        current = -1
        states: list[int] = []
        counted = 0
        offset = 0
        try:
            while offset < length:
                if length - offset < 16:
                    raise SockDiagError(f"truncated netlink header at byte {offset} of {length}")
                msg_len, msg_type = header(data, offset)
                state = data[offset + 17] if msg_len >= INET_DIAG_MSG_MIN else 0
                if (
                    msg_type != answer
                    or offset + msg_len > length
                    or not 0 < state <= TCP_NEW_SYN_RECV
                ):
                    unusual_message(data, offset, msg_len, msg_type, length, answer)
                    return True  # NLMSG_DONE (everything else raised)
                if data[offset + 16] != current:
                    current = data[offset + 16]
                    states = by_family[family_of(current, family, offset)]
                states[TCP_SYN_RECV if state == TCP_NEW_SYN_RECV else state] += 1
                counted += 1
                offset += (msg_len + 3) & ~3
            return False
        finally:
            self.messages += counted


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
    family: str | None,
    states: int,
    bytecode: bytes = b"",
    sequence: int = 1,
    extensions: int = 0,
) -> bytes:
    """A dump request; ``extensions`` is idiag_ext (e.g. INFO_EXTENSION). ``family`` None asks
    for both families in one walk (TCPDIAG_GETSOCK); answers then carry each its own family."""
    if family is None:
        kind = TCPDIAG_GETSOCK
        body = _BOTH_REQUEST.pack(socket.AF_UNSPEC, 0, 0, extensions, states, 0)
    else:
        kind = SOCK_DIAG_BY_FAMILY
        body = _REQUEST.pack(FAMILY_NUMBER[family], socket.IPPROTO_TCP, extensions, states)
        body += bytes(48)
    if bytecode:
        attr_len = 4 + len(bytecode)
        body += NLATTR.pack(attr_len, INET_DIAG_REQ_BYTECODE) + bytecode
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _NLMSGHDR.pack(16 + len(body), kind, flags, sequence, 0) + body


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
