"""Errors a user can cause and fix: printed by the CLI as one line each, exit code 3."""

from __future__ import annotations


class UsageError(Exception):
    """A problem the user can fix (a flag, an address, a missing privilege): one line, exit 3."""


def describe_error(error: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    text = str(error) or type(error).__name__
    return text.splitlines()[0]
