"""Shapes many rules share, so a new rule of a known shape is a few lines.

- :func:`bad_sysctl_rule`: a sysctl set to a value known to hurt, and the command that sets it
  back (K02, K04, K10).
- :func:`ratio_thresholds` / :func:`ratio_severity`: a ratio judged against a ``warning`` and a
  ``critical`` threshold (Q01, P01, K07).
- :func:`add_counter` / :func:`add_window`: kernel counters as evidence, under
  :func:`counter_key` names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

from tcpwatch.rules.base import (
    EvidenceValue,
    Finding,
    Rule,
    Severity,
    Threshold,
    Thresholds,
    Window,
    required,
    rule,
)
from tcpwatch.rules.fixes import sysctl_fix

_NO_FACTS: Mapping[str, EvidenceValue] = MappingProxyType({})
# A word boundary inside a CamelCase name: lower->Upper, or the last capital of an acronym.
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def counter_key(name: str) -> str:
    """A kernel counter's evidence key: its nstat name without the ``TcpExt`` group, snake_case.

    Every evidence key is snake_case (schema 2 of the JSON report).

    >>> counter_key("TcpExtListenOverflows")
    'listen_overflows'
    >>> counter_key("TcpExtTCPReqQFullDoCookies")
    'tcp_req_q_full_do_cookies'
    >>> counter_key("TcpRetransSegs")
    'tcp_retrans_segs'
    """
    rest = name.removeprefix("TcpExt")
    return _WORD_BOUNDARY.sub("_", rest).lower()


def add_counter(
    evidence: dict[str, EvidenceValue], window: Window, name: str, total: bool = True
) -> int | None:
    """Put a counter's growth in the window (and its value since boot) into the evidence."""
    delta = window.counter_delta(name)
    if delta is not None:
        evidence[f"{counter_key(name)}_in_window"] = delta
    counters = window.current.counters
    value = counters.get(name) if counters is not None else None
    if total and value is not None:
        evidence[f"{counter_key(name)}_total"] = value
    return delta


def add_window(evidence: dict[str, EvidenceValue], window: Window) -> None:
    """The window's length, when there is one, as ``window_seconds``."""
    seconds = window.seconds
    if seconds is not None:
        evidence["window_seconds"] = round(seconds, 3)


def bad_sysctl_rule(
    rule_id: str,
    slug: str,
    severity: Severity,
    title: str,
    *,
    sysctl: str,
    bad: Callable[[int], bool],
    fix: int,
    finding_title: str | Callable[[int], str],
    facts: Mapping[str, EvidenceValue] = _NO_FACTS,
    counters: tuple[str, ...] = (),
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
) -> Rule:
    """A rule that fires when ``sysctl`` has a value for which ``bad`` is true.

    The finding's evidence is the value (under the sysctl's last name component), then
    ``facts``, then each counter's growth and total and the window length (when ``counters``
    are given). The remediation is ``before`` (comment lines), the command setting ``fix`` now
    and across reboots (:func:`~tcpwatch.rules.fixes.sysctl_fix`), then ``after``. Silent when
    the sysctl source failed or the kernel lacks the sysctl.
    """
    short = sysctl.rsplit(".", 1)[-1]

    def check(window: Window, thresholds: Thresholds) -> Iterator[Finding]:
        sysctls = window.current.sysctls
        value = None if sysctls is None else sysctls.get(sysctl)
        if value is None or not bad(value):
            return
        evidence: dict[str, EvidenceValue] = {short: value, **facts}
        if counters:
            for name in counters:
                add_counter(evidence, window, name)
            add_window(evidence, window)
        command = sysctl_fix(window.current.netns, sysctl, fix, window.persisted_sysctls)
        yield declared.finding(
            window,
            finding_title if isinstance(finding_title, str) else finding_title(value),
            evidence,
            "\n".join((*before, command, *after)),
        )

    declared = rule(rule_id, slug, severity, title, sysctls=(sysctl,), counters=counters)(check)
    return declared


def ratio_thresholds(what: str, warning: float, critical: float) -> tuple[Threshold, Threshold]:
    """The ``warning`` and ``critical`` thresholds of a ratio (0.01 .. 1), described as
    "<what> for a warning" and "<what> for critical"."""
    return (
        Threshold("warning", warning, 0.01, 1.0, "ratio", f"{what} for a warning"),
        Threshold("critical", critical, 0.01, 1.0, "ratio", f"{what} for critical"),
    )


def ratio_severity(ratio: float, thresholds: Thresholds) -> Severity | None:
    """None below the ``warning`` threshold, else "critical" from ``critical`` up, else
    "warning"."""
    if ratio < required(thresholds, "warning"):
        return None
    return "critical" if ratio >= required(thresholds, "critical") else "warning"
