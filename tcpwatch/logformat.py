"""Log lines on stderr as node_exporter writes them: logfmt (default) or JSON, one record a line.

logfmt: ``ts=2026-12-01T04:55:12.123Z level=warn msg="source counters failed: ..."``. A value
is written bare when it is a non-empty run of printable characters other than space, ``=`` and
``"``; otherwise it is double-quoted with ``\\`` ``"`` and control characters escaped
(``\\n``, ``\\t``, ``\\u001b``), so every record is exactly one line a logfmt parser splits back
into the same keys and values. JSON: one object per line with the same keys.

A record may carry fields of its own, as node_exporter's ``msg="Listening on" address=[::]:9100``:
``log.info("Listening on", extra=fields(address="[::]:9477", tls="false"))``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

LOG_FORMATS = ("logfmt", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# node_exporter's (go-kit's) level names: "warn", not "warning".
_LEVEL_NAMES = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error"}
_FIELDS = "tcpwatch_fields"  # the LogRecord attribute extra= fields land in
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def logfmt_value(value: str) -> str:
    """``value`` as one logfmt value: bare when that is unambiguous, else quoted and escaped."""
    if value and all(c.isprintable() and c not in ' ="' for c in value):
        return value
    escaped = "".join(_ESCAPES.get(c, c if c.isprintable() else f"\\u{ord(c):04x}") for c in value)
    return f'"{escaped}"'


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> list[tuple[str, str]]:
    # UTC with milliseconds, as RFC 3339 wants it and node_exporter writes it.
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    fields = [
        ("ts", f"{stamp}.{int(record.msecs):03d}Z"),
        ("level", _LEVEL_NAMES.get(record.levelname, record.levelname.lower())),
        ("msg", record.getMessage()),
    ]
    own = getattr(record, _FIELDS, None)
    if isinstance(own, dict):
        fields += [(str(key), str(value)) for key, value in own.items()]
    if record.exc_info:
        fields.append(("exc", formatter.formatException(record.exc_info)))
    return fields


def fields(**values: object) -> dict[str, dict[str, object]]:
    """Keys and values of one record, after ``msg`` (pass as ``extra=``)."""
    return {_FIELDS: values}


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in _fields(record, self))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(dict(_fields(record, self)), ensure_ascii=False)


def setup_logging(level: str, log_format: str = "logfmt", stream: TextIO | None = None) -> None:
    """Route every log record to ``stream`` (stderr) at ``level`` in ``log_format``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
