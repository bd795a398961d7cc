"""The ``sysctl_files`` source exports nothing: its lines are evidence for the rules."""

from __future__ import annotations

from tcpwatch.render.families.base import NoFamilies

SYSCTL_FILES = NoFamilies(
    "sysctl_files",
    "the persisted sysctl lines are what K03, K08 and every sysctl fix read (a leftover "
    "tcp_tw_recycle, a line a reboot would bring back); a series per line would be "
    "configuration, not a measurement. Its health is tcpwatch_source_up like any source.",
)
