"""Persisted sysctl settings: the lines that set kernel tunables at boot (the host-wide source
``sysctl_files``).

Rules read these to find settings that no longer exist (``tcp_tw_recycle`` left in
/etc/sysctl.conf after Linux 4.12) and lines that would override a fix after a reboot.

Files are read the way ``sysctl --system`` (procps) and systemd-sysctl apply them: every
``*.conf`` in the drop-in directories, ordered by file name, a name in an earlier directory
masking the same name in later ones (/etc before /run before /usr/local/lib before /usr/lib and
/lib), then /etc/sysctl.conf last unless a drop-in already links to it. A later line for the same
key wins: the last assignment of a name is the one in effect.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tcpwatch.model import PersistedSysctl, Snapshot
from tcpwatch.paths import SYSCTL_DROP_IN_DIRECTORIES, SYSCTL_MAIN_FILE, read_text
from tcpwatch.sources.base import SourceContext, host_source

_MAX_FILE_BYTES = 1 << 20  # a sysctl file is a few KiB; refuse to slurp anything huge


class SysctlConfError(ValueError):
    """A line of a sysctl configuration file that is not ``key = value``."""

    def __init__(self, path: str, line: int, text: str) -> None:
        super().__init__(f"{path}:{line}: expected 'key = value', got {text!r}")
        self.path = path
        self.line = line
        self.text = text


def parse_sysctl_conf(text: str, path: str, strict: bool = True) -> tuple[PersistedSysctl, ...]:
    """Parse the text of a sysctl.conf / sysctl.d file.

    Example input (``path`` = "/etc/sysctl.conf")::

        # comment
        ; also a comment
        net.ipv4.tcp_tw_recycle = 1
        net/core/somaxconn=1024
        -net.ipv4.tcp_fin_timeout = 30

    gives ``PersistedSysctl("/etc/sysctl.conf", 3, "net.ipv4.tcp_tw_recycle", "1")``,
    ``(..., 4, "net.core.somaxconn", "1024")`` and ``(..., 5, "net.ipv4.tcp_fin_timeout", "30")``.
    A line without "=" raises :class:`SysctlConfError` (file, line number, text) when ``strict``,
    and is skipped otherwise, as systemd-sysctl skips it with a warning.
    """
    entries: list[PersistedSysctl] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, equals, value = line.partition("=")
        key = key.strip().lstrip("-").strip()
        if not equals or not key:
            if strict:
                raise SysctlConfError(path, number, raw)
            continue
        entries.append(PersistedSysctl(path, number, key.replace("/", "."), value.strip()))
    return tuple(entries)


def _conf_files(root: str) -> list[str]:
    """Host paths (without ``root``) of the files to read, in the order they are applied."""
    chosen: dict[str, str] = {}
    for directory in SYSCTL_DROP_IN_DIRECTORIES:
        try:
            names = os.listdir(_resolve(root, "/" + directory))
        except OSError:
            continue
        for name in names:
            if name.endswith(".conf") and name not in chosen:
                chosen[name] = "/" + directory + "/" + name
    ordered = [chosen[name] for name in sorted(chosen)]
    main = "/" + SYSCTL_MAIN_FILE
    try:
        resolved = {_resolve(root, path) for path in ordered}
        if _resolve(root, main) in resolved:
            return ordered
    except OSError:
        pass
    ordered.append(main)
    return ordered


def _resolve(root: str, host_path: str) -> str:
    """Where ``host_path`` of the host is below ``root``, symlinks followed as the host would.

    An absolute link target is the host's path, so it is taken below ``root`` too: with the
    node's / at /host, /host/etc/sysctl.d/99-sysctl.conf -> /etc/sysctl.conf is
    /host/etc/sysctl.conf, not the container's own file. Bounded like the kernel's 40 links.
    """
    root = os.path.realpath(root)
    if root == "/":
        return os.path.realpath(host_path)
    parts = [part for part in host_path.split("/") if part]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "." or not part:
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        here = os.path.join(root, *resolved, part)
        if not os.path.islink(here):
            resolved.append(part)
            continue
        hops += 1
        if hops > 40:
            raise OSError(f"too many levels of symbolic links: {host_path}")
        target = os.readlink(here)
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p] + parts
    return os.path.join(root, *resolved)


def _read(root: str, host_path: str) -> str | None:
    try:
        return read_text(_resolve(root, host_path), _MAX_FILE_BYTES, encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def read_persisted_sysctls(etc_root: str = "/") -> tuple[PersistedSysctl, ...]:
    """Every assignment in the host's sysctl files, in the order they would be applied.

    ``etc_root`` is the host's root filesystem to read below (``--path.rootfs``, config
    ``rootfs``: "/" on a live host, the node's / mounted into a container, a fixture tree in
    tests); paths in the result are as seen on the host. Unreadable files are skipped, and so
    are malformed lines (see :func:`parse_sysctl_conf`): this is advice input, never fatal.
    """
    return read_watched(etc_root)[0]


def read_watched(etc_root: str = "/") -> tuple[tuple[PersistedSysctl, ...], list[str]]:
    """:func:`read_persisted_sysctls` and the paths it depends on, for a FileMemo: each
    directory listed and each file read, below ``etc_root`` as named and as resolved."""
    watched = [os.path.join(etc_root, d) for d in SYSCTL_DROP_IN_DIRECTORIES]
    for directory in SYSCTL_DROP_IN_DIRECTORIES:
        try:
            watched.append(_resolve(etc_root, "/" + directory))
        except OSError:
            continue
    entries: list[PersistedSysctl] = []
    seen: set[str] = set()
    for host_path in _conf_files(etc_root):
        watched.append(os.path.join(etc_root, host_path.lstrip("/")))
        try:
            real = _resolve(etc_root, host_path)
        except OSError:
            continue
        watched.append(real)
        if real in seen:  # /lib -> /usr/lib on merged-/usr systems
            continue
        seen.add(real)
        text = _read(etc_root, host_path)
        if text is not None:
            entries.extend(parse_sysctl_conf(text, host_path, strict=False))
    return tuple(entries), watched


@host_source("sysctl_files", field="persisted_sysctls", order=70)
def read_sysctl_files_source(
    context: SourceContext, snapshots: Sequence[Snapshot]
) -> tuple[PersistedSysctl, ...]:
    """The host's persisted settings, below ``--path.rootfs``: one read for every namespace.

    The rules judge only the host namespace (or the only one polled) against them, since the
    files set the host's tunables at boot. Serve reuses the last poll's lines while none of
    the files or directories changed (sources/filememo.py).
    """
    root = context.paths.rootfs
    if context.memo is None:
        return read_persisted_sysctls(root)
    return context.memo.reuse(("sysctl_files", root), lambda: read_watched(root))
