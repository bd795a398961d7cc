"""Entering a network namespace: run work on a thread that setns() into it, and nothing else."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from tcpwatch.sources.netns.discovery import NetnsTarget

T = TypeVar("T")


class NetnsGone(Exception):
    """The namespace vanished between discovery and entering it."""


def run_inside(target: NetnsTarget, work: Callable[[], T], timeout: float = 60.0) -> T:
    """Run ``work`` with this thread's network namespace switched to ``target``.

    setns() changes only the calling thread, so the work runs in a fresh thread that enters the
    namespace and ends afterwards; the rest of the process never leaves its own namespace. Sockets
    opened there stay bound to that namespace, and /proc/thread-self/net and /proc/sys/net show it.
    """
    if target.path is None:
        return work()
    try:
        descriptor = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as error:
        raise NetnsGone(f"{target.name}: {error.strerror}") from None
    # Between discovery and now the pid may have been reused, or `ip netns del` may have left
    # the unmounted file: either way the handle no longer leads to the namespace we named.
    try:
        opened = os.fstat(descriptor).st_ino
    except OSError:
        opened = None
    if opened != target.inode:
        os.close(descriptor)
        raise NetnsGone(f"{target.name}: {target.path} no longer refers to net:[{target.inode}]")
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_work() -> None:
        try:
            _setns(descriptor)
            outcome.append(work())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    try:
        thread = threading.Thread(target=enter_and_work, name=f"netns-{target.name}", daemon=True)
        thread.start()
        thread.join(timeout)
    finally:
        os.close(descriptor)
    if thread.is_alive():
        raise TimeoutError(f"polling namespace {target.name} took over {timeout:g} s")
    if failure:
        raise failure[0]
    return outcome[0]


def _setns(descriptor: int) -> None:
    from pyroute2 import netns as pyroute2_netns

    try:
        # flags=0: never create anything; an fd argument is used as it is.
        pyroute2_netns.setns(descriptor, flags=0)
    except OSError as error:
        if error.errno == errno.EPERM:
            raise PermissionError(
                "entering another network namespace needs CAP_SYS_ADMIN"
            ) from None
        raise
