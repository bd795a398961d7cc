"""Counting a run of timewait sockets' messages in a sock_diag datagram by columns.

A namespace under churn holds thousands of TIME_WAIT sockets, and a poll that only counts them
(sockdiag.DumpAggregator without a port range) pays Python's per-message loop for each: about
0.4 us a message. Their messages have one fixed size (nlmsghdr + inet_diag_msg, 88 bytes, and
on 6.18 INET_DIAG_MARK when the reader has CAP_NET_ADMIN, 96: inet_twsk_diag_fill), so a run of
them sits at a fixed stride in the datagram and its fields can be read as columns (strided
slices, done in C) and counted with ``bytes.count``.

Only messages that the per-message path would merely count are taken: the same header (length,
type, flags) as the first, the same family, the timewait timer, TIME_WAIT or FIN_WAIT2, and
sport != dport (a possible self-connect goes the long way). The run ends at the first message
that is not such a one, so the counts are exactly the per-message path's.
"""

from __future__ import annotations

MESSAGE_MIN = 88  # nlmsghdr (16) + inet_diag_msg (72)
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TIMER_TIME_WAIT = 3
_TIMER = 18
_ONE_LANE = (1).to_bytes(8, "little")
_MIN_RUN = 2
# FIN_WAIT2 read as TIME_WAIT, so one comparison finds where the timewait states end
_TIMEWAIT_STATES = bytes(TCP_TIME_WAIT if n == TCP_FIN_WAIT2 else n for n in range(256))


def timewait_run(view: memoryview, offset: int, size: int, length: int, states: list[int]) -> int:
    """The number of messages in the run starting at ``offset`` (each ``size`` bytes, the first
    one's length), their sockets added to ``states`` (index = state number); 0, nothing added,
    when there is no run of at least two (the caller then takes the message the long way).

    The caller has checked the first message: its type is the dump's answer, its timer
    TIMER_TIME_WAIT, it fits in the datagram.
    """
    count = (length - offset) // size
    if count < _MIN_RUN or size % 8 or size < MESSAGE_MIN:
        return 0
    second = offset + size
    if (
        view[second + _TIMER] != TIMER_TIME_WAIT
        or view[second : second + 8] != view[offset : offset + 8]
    ):
        return 0  # a lone one (the common case in a dump of ESTABLISHED sockets)
    stride = size // 8
    span = view[offset : offset + count * size].cast("Q")  # ``stride`` u64 a message
    run = _prefix(span[::stride].tobytes(), view[offset : offset + 8].tobytes(), 8)
    # bytes 16-23 of each message: family, state, timer, retrans (0 for timewait), sport, dport
    fields = span[2::stride].tobytes()[: 8 * run]
    run = min(
        _prefix(fields[0::8], fields[0:1]),  # the first message's family
        _prefix(fields[2::8], b"\x03"),  # TIMER_TIME_WAIT
        _prefix(fields[3::8], b"\x00"),
        _prefix(fields[1::8].translate(_TIMEWAIT_STATES), b"\x06"),
    )
    run = min(run, _first_self_connect(fields, run))
    if run < _MIN_RUN:
        return 0
    time_wait = fields[1 : 8 * run : 8].count(TCP_TIME_WAIT)
    states[TCP_TIME_WAIT] += time_wait
    states[TCP_FIN_WAIT2] += run - time_wait
    return run


def _first_self_connect(fields: bytes, run: int) -> int:
    """The index of the first of ``run`` messages with sport == dport, or ``run``.

    Whether there is one is asked of all at once: read as one integer, each message is a 64-bit
    lane whose bits 32-47 are sport and 48-63 dport; their XOR is 0 in a lane only if the ports
    are equal, and subtracting 1 from every lane sets a lane's bit 63 only through a zero lane
    (lanes below 2**16 cannot borrow otherwise)."""
    lanes = int.from_bytes(fields[: 8 * run], "little")
    ones = int.from_bytes(_ONE_LANE * run, "little")
    xored = ((lanes >> 32) ^ (lanes >> 48)) & (ones * 0xFFFF)
    if not (xored - ones) & (ones << 63):
        return run
    sports = fields[4 : 8 * run : 8], fields[5 : 8 * run : 8]
    dports = fields[6 : 8 * run : 8], fields[7 : 8 * run : 8]
    same = [a == c and b == d for a, b, c, d in zip(*sports, *dports, strict=True)]
    return same.index(True)


def _prefix(column: bytes, unit: bytes, width: int = 1) -> int:
    """How many leading ``width``-byte items of ``column`` equal ``unit`` (binary search on
    whole-prefix comparisons, each a memcmp)."""
    items = len(column) // width
    expected = unit * items
    if column == expected:
        return items
    low, high = 0, items - 1  # the prefix of ``low`` items matches; ``items`` does not
    while low < high:
        middle = (low + high + 1) // 2
        if column[: middle * width] == expected[: middle * width]:
            low = middle
        else:
            high = middle - 1
    return low
