"""Persisted sysctl files: the parser and the boot-order reader, on a fixture root in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcpwatch.config import CollectSettings, Config
from tcpwatch.model import PersistedSysctl, lines_for
from tcpwatch.pipeline import SnapshotTaker
from tcpwatch.sources.registry import source_names
from tcpwatch.sources.sysctl_files import (
    SysctlConfError,
    parse_sysctl_conf,
    read_persisted_sysctls,
)
from tests.unit.snapshots import effective

FIXTURE_PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc"

SAMPLE = """\
# comment
; also a comment

net.ipv4.tcp_tw_recycle = 1
net/core/somaxconn=1024
-net.ipv4.tcp_fin_timeout = 30
  net.ipv4.ip_local_port_range =   1024\t65000
net.ipv4.ip_local_reserved_ports = 8080,9000-9010
"""


def test_parse_reads_every_assignment_with_its_line_number() -> None:
    entries = parse_sysctl_conf(SAMPLE, "/etc/sysctl.conf")
    assert entries == (
        PersistedSysctl("/etc/sysctl.conf", 4, "net.ipv4.tcp_tw_recycle", "1"),
        PersistedSysctl("/etc/sysctl.conf", 5, "net.core.somaxconn", "1024"),
        PersistedSysctl("/etc/sysctl.conf", 6, "net.ipv4.tcp_fin_timeout", "30"),
        PersistedSysctl("/etc/sysctl.conf", 7, "net.ipv4.ip_local_port_range", "1024\t65000"),
        PersistedSysctl(
            "/etc/sysctl.conf", 8, "net.ipv4.ip_local_reserved_ports", "8080,9000-9010"
        ),
    )


def test_parse_strict_names_file_line_and_text_of_a_malformed_line() -> None:
    with pytest.raises(SysctlConfError) as caught:
        parse_sysctl_conf("net.core.somaxconn = 1\nnet.ipv4.tcp_syncookies 1\n", "/etc/x.conf")
    assert (
        str(caught.value)
        == "/etc/x.conf:2: expected 'key = value', got 'net.ipv4.tcp_syncookies 1'"
    )
    assert (caught.value.path, caught.value.line) == ("/etc/x.conf", 2)
    with pytest.raises(SysctlConfError):
        parse_sysctl_conf(" = 3\n", "/etc/y.conf")


def test_parse_lenient_skips_malformed_lines_and_keeps_the_rest() -> None:
    entries = parse_sysctl_conf("garbage\nnet.core.somaxconn = 8\n", "/f", strict=False)
    assert entries == (PersistedSysctl("/f", 2, "net.core.somaxconn", "8"),)


def _write(root: Path, host_path: str, text: str) -> None:
    path = root / host_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_read_orders_files_by_name_masks_lower_directories_and_reads_sysctl_conf_last(
    tmp_path: Path,
) -> None:
    _write(tmp_path, "/usr/lib/sysctl.d/50-default.conf", "net.core.somaxconn = 128\n")
    _write(tmp_path, "/usr/lib/sysctl.d/70-masked.conf", "net.ipv4.tcp_fin_timeout = 1\n")
    _write(tmp_path, "/etc/sysctl.d/70-masked.conf", "net.ipv4.tcp_fin_timeout = 30\n")
    _write(tmp_path, "/run/sysctl.d/60-run.conf", "net.core.somaxconn = 256\n")
    _write(tmp_path, "/etc/sysctl.d/README", "not a conf file = 1\n")
    _write(tmp_path, "/etc/sysctl.conf", "net.core.somaxconn = 1024\n")
    entries = read_persisted_sysctls(str(tmp_path))
    assert [(e.path, e.name, e.value) for e in entries] == [
        ("/usr/lib/sysctl.d/50-default.conf", "net.core.somaxconn", "128"),
        ("/run/sysctl.d/60-run.conf", "net.core.somaxconn", "256"),
        ("/etc/sysctl.d/70-masked.conf", "net.ipv4.tcp_fin_timeout", "30"),
        ("/etc/sysctl.conf", "net.core.somaxconn", "1024"),
    ]
    winner = effective(entries, "net.core.somaxconn")
    assert winner is not None and winner.path == "/etc/sysctl.conf"
    assert len(lines_for(entries, "net.core.somaxconn")) == 3
    assert effective(entries, "net.ipv4.tcp_tw_recycle") is None


def test_read_does_not_read_sysctl_conf_twice_through_the_debian_symlink(tmp_path: Path) -> None:
    _write(tmp_path, "/etc/sysctl.conf", "net.ipv4.tcp_tw_recycle = 1\n")
    (tmp_path / "etc" / "sysctl.d").mkdir()
    os.symlink("../sysctl.conf", tmp_path / "etc" / "sysctl.d" / "99-sysctl.conf")
    entries = read_persisted_sysctls(str(tmp_path))
    assert entries == (
        PersistedSysctl("/etc/sysctl.d/99-sysctl.conf", 1, "net.ipv4.tcp_tw_recycle", "1"),
    )


def test_read_skips_unreadable_files_and_missing_directories(tmp_path: Path) -> None:
    (tmp_path / "etc" / "sysctl.d" / "10-dir.conf").mkdir(parents=True)
    (tmp_path / "etc" / "sysctl.d" / "20-binary.conf").write_bytes(b"\xff\xfe = \x00\n")
    _write(tmp_path, "/etc/sysctl.d/30-good.conf", "bad line\nnet.core.somaxconn = 4096\n")
    entries = read_persisted_sysctls(str(tmp_path))
    assert entries == (
        PersistedSysctl("/etc/sysctl.d/30-good.conf", 2, "net.core.somaxconn", "4096"),
    )
    assert read_persisted_sysctls(str(tmp_path / "nowhere")) == ()


def test_the_sysctl_files_source_reads_below_the_configured_rootfs(tmp_path: Path) -> None:
    """A registered host-wide source like the others: --path.rootfs reaches it, its status is
    reported, and its lines fill the snapshot (only the source itself runs here)."""
    _write(tmp_path, "/etc/sysctl.conf", "net.ipv4.tcp_tw_recycle = 1\n")
    others = tuple(name for name in source_names() if name not in ("netns", "sysctl_files"))
    config = Config(
        procfs=str(FIXTURE_PROC),
        rootfs=str(tmp_path),
        collect=CollectSettings(disabled_sources=others),
    )
    (snapshot,) = SnapshotTaker()(config)
    assert [(status.name, status.ok) for status in snapshot.sources] == [("sysctl_files", True)]
    assert snapshot.persisted_sysctls == (
        PersistedSysctl("/etc/sysctl.conf", 1, "net.ipv4.tcp_tw_recycle", "1"),
    )
