"""A long-lived example source, loaded into a real ``tcpwatch serve`` through
``TCPWATCH_SOURCE_MODULES=tests.integration.example_source`` (see docs/architecture.md).

It gathers datagrams sent to a UNIX socket ``<dir>/<netns inode>.sock`` (``dir`` from
``TCPWATCH_EXAMPLE_SOURCE_DIR``) and writes what the pipeline asks of it to ``<dir>/journal``:
``start``, ``drain <count>`` (datagrams since the previous drain) and ``close``, each with the
namespace's inode. A datagram ``fail`` makes the next read raise, as a broken source would.
"""

from __future__ import annotations

import os
import socket
import threading

from tcpwatch.config import CollectSettings
from tcpwatch.model import Snapshot
from tcpwatch.sources.base import SourceContext, long_lived_source

DIRECTORY_VARIABLE = "TCPWATCH_EXAMPLE_SOURCE_DIR"
NAME = "example"


def _journal(line: str) -> None:
    with open(os.path.join(os.environ[DIRECTORY_VARIABLE], "journal"), "a") as journal:
        journal.write(line + "\n")


class ExampleGatherer:
    def __init__(self, inode: int) -> None:
        self._inode = inode
        self._path = os.path.join(os.environ[DIRECTORY_VARIABLE], f"{inode}.sock")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if os.path.exists(self._path):
            os.unlink(self._path)
        self._socket.bind(self._path)
        self._socket.setblocking(False)
        self._lock = threading.Lock()
        self._count = 0
        _journal(f"start {inode}")

    def fileno(self) -> int:
        return self._socket.fileno()

    def read_ready(self) -> None:
        for _ in range(1000):  # bounded: the rest waits for the next wake-up
            try:
                datagram = self._socket.recv(64)
            except BlockingIOError:
                return
            if datagram == b"fail":
                raise RuntimeError("the example source was asked to fail")
            with self._lock:
                self._count += 1

    def drain(self, so_far: Snapshot) -> int:
        with self._lock:
            count, self._count = self._count, 0
        _journal(f"drain {self._inode} {count}")
        return count

    def close(self) -> None:
        self._socket.close()
        os.unlink(self._path)
        _journal(f"close {self._inode}")


def _enabled(settings: CollectSettings) -> bool:
    return DIRECTORY_VARIABLE in os.environ


@long_lived_source(NAME, field=None, order=90, enabled=_enabled)
def start_example(context: SourceContext) -> ExampleGatherer:
    return ExampleGatherer(context.netns_inode)
