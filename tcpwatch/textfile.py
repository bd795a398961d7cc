"""Atomic file output for node_exporter's textfile collector (`tcpwatch metrics --output FILE`).

node_exporter reads every *.prom file in its directory on each scrape; a file caught half written
would be a parse error or, worse, a scrape with some series missing. So the exposition goes to a
temporary file in the same directory (a rename is atomic only within one filesystem), is flushed
to disk, then renamed over FILE: a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import os

from tcpwatch.errors import UsageError

# node_exporter runs as its own user (Debian: prometheus): the file must be readable by others.
FILE_MODE = 0o644


def write_atomically(path: str, content: bytes) -> None:
    """Replace ``path`` with ``content`` in one rename; UsageError names what failed."""
    directory = os.path.dirname(os.path.abspath(path))
    # A dot name without .prom, so the collector never reads the temporary file.
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except OSError as error:
        raise UsageError(
            f"--output {path}: cannot create a file in {directory}: {error.strerror}"
        ) from None
    try:
        try:
            os.fchmod(descriptor, FILE_MODE)  # whatever the umask
            view = memoryview(content)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise UsageError(f"--output {path}: cannot write: {error.strerror}") from None
    # The rename itself survives a crash only once the directory is on disk too.
    with contextlib.suppress(OSError):
        directory_descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_descriptor)
        finally:
            os.close(directory_descriptor)
