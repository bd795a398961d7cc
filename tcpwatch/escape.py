"""Strings from the host or from a remote server, made safe for where they are printed.

A process names itself (``prctl(PR_SET_NAME)``: 15 bytes, anything but NUL), a namespace is a
file name under /run/netns, a sysctl drop-in is a file name under /etc/sysctl.d, and a daemon
read with ``--from`` may answer anything. None of them may reach a terminal, a fix block an
operator pastes into a root shell, or a comment line of that block as they are. One function per
destination, so every caller escapes the same way:

* :func:`terminal`: text for a terminal line. Every character that is not printable (C0 and C1
  controls, DEL, line and paragraph separators, bidirectional and other format characters, bytes
  that were not UTF-8) is shown as an escape as bash's ``$'...'`` reads it (``\\n``, ``\\x1b``,
  ``\\u0085``, ``\\u202e``; ``\\xff`` for a byte that was not UTF-8); the result is one line
  without control characters. A backslash is left as it is, so escaping twice changes nothing.
* :func:`shell_comment`: text after ``#`` on a comment line of a fix block. The same one line:
  nothing in it can end the comment and start a command on the next line.
* :func:`shell_word`: one argument of a command in a fix block. ``shlex.quote`` when the text is
  printable; otherwise bash's ``$'...'`` with every unprintable character, backslash and single
  quote written as an escape, so the word stays one argument in every shell (dash, which lacks
  ``$'...'``, reads it as a literal word that names nothing) and carries no control character.
"""

from __future__ import annotations

import shlex

_SURROGATE_BYTES = range(0xDC80, 0xDD00)  # os.fsdecode's stand-ins for bytes that are not UTF-8


def _escape(char: str) -> str:
    code = ord(char)
    if code in _SURROGATE_BYTES:
        return f"\\x{code - 0xDC00:02x}"  # the byte the name had
    if code < 0x80:  # ASCII; U+0080..U+00FF are characters, not bytes: \u0085, as bash reads it
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{code:02x}")
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def terminal(text: str) -> str:
    """``text`` as one terminal line: unprintable characters escaped (``\\x1b``, ``\\n``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def shell_comment(text: str) -> str:
    """``text`` for a ``#`` comment line of a fix block: one line, no control character."""
    return terminal(text)


def shell_word(text: str) -> str:
    """``text`` as one shell word: ``shlex.quote`` if printable, else bash's ``$'...'``."""
    if text.isprintable():
        return shlex.quote(text)
    quoted = "".join(
        "\\\\" if c == "\\" else _escape(c) if c == "'" or not c.isprintable() else c for c in text
    )
    return f"$'{quoted}'"
