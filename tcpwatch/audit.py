"""Snapshots of every polled namespace -> findings: one Window per namespace, evaluated alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tcpwatch.config import Config
from tcpwatch.model import Snapshot
from tcpwatch.rules import Finding, RuleSettings, Window, evaluate, sort_key


def rule_settings(config: Config) -> dict[str, RuleSettings]:
    return {
        rule_id: RuleSettings(enabled=override.enabled, thresholds=dict(override.thresholds))
        for rule_id, override in config.rules.items()
    }


def audit(
    current: Sequence[Snapshot],
    previous: Mapping[str, Snapshot],
    settings: Mapping[str, RuleSettings],
    close_wait_first_seen: Mapping[str, Mapping[int, float]] | None = None,
) -> list[Finding]:
    """Evaluate the rules in each namespace against its own earlier snapshot (by netns name).

    /etc/sysctl* lines (the ``sysctl_files`` source, in every snapshot) are the host's: only the
    host namespace (or the only one polled) is judged against them.
    """
    findings: list[Finding] = []
    first_seen = close_wait_first_seen or {}
    for snapshot in current:
        host_like = snapshot.netns == "host" or len(current) == 1
        before = previous.get(snapshot.netns)
        if before is not None and before.identity.inode != snapshot.identity.inode:
            before = None  # same name, new namespace (a re-created pod): nothing to compare
        window = Window(
            current=snapshot,
            previous=before,
            close_wait_first_seen=first_seen.get(snapshot.netns, {}),
            persisted_sysctls=(snapshot.persisted_sysctls or ()) if host_like else (),
        )
        findings.extend(evaluate(window, settings))
    findings.sort(key=sort_key)
    return findings
