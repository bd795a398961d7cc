"""Many datagrams per syscall: recvmmsg(2) into preallocated slots (Python's socket module has no
recvmmsg).

The destroy multicast queues one datagram per closed socket. Reading them one ``recv_into`` at
a time costs ~1.4 us each on 6.18 (the syscall's entry and exit, and Python's call), reading 64
per recvmmsg ~1.1 us each (benchmarks/bench_destroy_reader.py, in docs/performance.md). The
slots, their iovecs and the message headers are allocated once (``Slots``); a batch allocates
only the list of lengths it returns.

``Slots`` hold no descriptor: the daemon's gathering thread reads every namespace's destroy
socket in turn into one set of SHARED_SLOTS slots (lifecycle.DestroyListener.share), so a batch
can be four times longer (its fixed cost, the call and the parse's per-batch work, spread over
more events) at the memory of one reader.
"""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import Callable

DEFAULT_SLOTS = 64  # a reader's own slots (128 KiB)
SHARED_SLOTS = 256  # the slots every reader of one thread shares (512 KiB)
# One destroy message is 380 bytes on 6.18 (inet_diag_msg, tcp_info, a few small attributes);
# a longer datagram is cut to the slot and reported truncated (its parse then fails: malformed).
DEFAULT_SLOT_SIZE = 2048
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)

# recvmmsg(fd, struct mmsghdr *vec, unsigned vlen, int flags, struct timespec *timeout)
RecvMmsg = Callable[[int, object, int, int, object], int]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MmsgHdr(ctypes.Structure):
    _fields_ = [("header", _MsgHdr), ("length", ctypes.c_uint32)]


# Where a header's msg_flags and msg_len sit, in 32-bit words from its start (12 and 14 on
# x86_64 and arm64, whose mmsghdr is 64 bytes).
_WORDS = ctypes.sizeof(_MmsgHdr) // 4
_FLAGS_WORD = (_MmsgHdr.header.offset + _MsgHdr.flags.offset) // 4
_LENGTH_WORD = _MmsgHdr.length.offset // 4


def libc_recvmmsg() -> RecvMmsg:
    """libc's recvmmsg, typed; OSError when the C library has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).recvmmsg
    except AttributeError as error:
        raise OSError(errno.ENOSYS, "this C library has no recvmmsg") from error
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    function.restype = ctypes.c_int
    received: RecvMmsg = function
    return received


class Slots:
    """``count`` receive slots of ``size`` bytes, their iovecs and mmsghdrs, for any descriptor.

    Datagram ``i`` of a batch is ``buffer[i * size : i * size + lengths[i]]`` until the next
    ``receive`` into the same slots: one thread uses them, one batch at a time.
    """

    def __init__(self, count: int = DEFAULT_SLOTS, size: int = DEFAULT_SLOT_SIZE) -> None:
        self.count = count
        self.size = size
        self._data = (ctypes.c_char * (count * size))()
        self.buffer = memoryview(self._data).cast("B")
        base = ctypes.addressof(self._data)
        self._iovecs = (_IoVec * count)()
        self.headers = (_MmsgHdr * count)()
        for index in range(count):
            self._iovecs[index].base = base + index * size
            self._iovecs[index].length = size
            self.headers[index].header.iov = ctypes.addressof(self._iovecs[index])
            self.headers[index].header.iovlen = 1
        self.words = memoryview(self.headers).cast("B").cast("I")


class BatchReceiver:
    """Receives up to ``slots`` datagrams of a non-blocking socket per call.

    Datagram ``i`` of a batch is ``buffer[i * slot_size : i * slot_size + lengths[i]]``.
    ``receive`` returns the lengths (empty when nothing is pending; -1 for a datagram longer
    than its slot, which was cut: MSG_TRUNC) and raises OSError for any other error, ENOBUFS
    included: the caller counts it and calls again (the kernel reports an overrun once, on the
    call after the datagrams received before it). ``shared``: slots of its own when None, else
    these (other receivers of the same thread may use them between this one's batches).
    """

    def __init__(
        self,
        fd: int,
        slots: int = DEFAULT_SLOTS,
        slot_size: int = DEFAULT_SLOT_SIZE,
        call: RecvMmsg | None = None,
        shared: Slots | None = None,
    ) -> None:
        self.fd = fd
        self._call = call if call is not None else libc_recvmmsg()
        self._slots = shared if shared is not None else Slots(slots, slot_size)
        self.slots = self._slots.count
        self.slot_size = self._slots.size
        self.buffer = self._slots.buffer

    def receive(self) -> list[int]:
        slots = self._slots
        got = self._call(self.fd, slots.headers, slots.count, _MSG_DONTWAIT, None)
        if got < 0:
            number = ctypes.get_errno()
            if number in _AGAIN:
                return []
            raise OSError(number, f"recvmmsg: {errno.errorcode.get(number, number)}")
        # Each header's msg_len and msg_flags as one strided slice each (tolist in C: ~17 ns a
        # datagram against ~110 for a Python loop over the headers); flags are nearly always 0.
        end = got * _WORDS
        words = slots.words
        lengths: list[int] = words[_LENGTH_WORD:end:_WORDS].tolist()
        flags: list[int] = words[_FLAGS_WORD:end:_WORDS].tolist()
        if any(flags):
            for index, flag in enumerate(flags):
                if flag & _MSG_TRUNC:
                    lengths[index] = -1
        return lengths
