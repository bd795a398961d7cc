"""`tcpwatch rules`: the rule catalogue, the thresholds in effect, and each rule's page offline.

The pages are docs/rules/*.md, shipped inside the package as ``tcpwatch/ruledocs`` (a symlink to
docs/rules in the source tree, copied into the wheel and the Debian package), so ``tcpwatch
rules Q01`` works with no network and no checkout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from tcpwatch.cli_parser import EXIT_OK
from tcpwatch.config import Config
from tcpwatch.errors import UsageError
from tcpwatch.render.rulepage import read_rule_page, rule_named
from tcpwatch.render.status import doc_url, offline_page
from tcpwatch.rules import RULES, Rule
from tcpwatch.validation import show


def rules_command(config: Config, args: argparse.Namespace) -> int:
    if args.rule is not None:
        chosen = find_rule(args.rule)
        if args.format == "json":
            sys.stdout.write(json.dumps(rule_document(chosen, config), indent=2) + "\n")
        else:
            sys.stdout.write(rule_page(chosen))
        return EXIT_OK
    if args.format == "json":
        document = {
            "config": config.source,
            "docs_url": config.docs_url,
            "window_seconds": config.rules_window,
            "window_configured": config.rules_window != Config().rules_window,
            "rules": [rule_document(rule, config) for rule in RULES],
        }
        sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
        return EXIT_OK
    sys.stdout.write(catalogue_text(config))
    return EXIT_OK


def find_rule(name: str) -> Rule:
    """A rule by id (``Q01``, any case) or slug (``accept-queue-full``)."""
    rule = rule_named(name)
    if rule is not None:
        return rule
    known = ", ".join(rule.id for rule in RULES)
    raise UsageError(f"rules: no rule {show(name)} (known: {known}; or a slug)")


def rule_page(rule: Rule) -> str:
    """The rule's page (Markdown), as shipped in the package."""
    text = read_rule_page(rule)
    if text is None:
        raise UsageError(
            f"rules: the page {rule.doc} is not installed with this copy of tcpwatch "
            "(it is in the tcpwatch source tree)"
        )
    return text


def _number(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def rule_document(rule: Rule, config: Config) -> dict[str, Any]:
    override = config.rules.get(rule.id)
    configured = override.thresholds if override is not None else {}
    values = rule.threshold_values(configured)
    return {
        "id": rule.id,
        "slug": rule.slug,
        "severity": rule.severity,
        "title": rule.title,
        "enabled": override.enabled if override is not None else True,
        "doc": rule.doc,
        "doc_url": doc_url(rule.doc, config.docs_url),
        "sysctls": list(rule.sysctls),
        "counters": list(rule.counters),
        "thresholds": [
            {
                "name": t.name,
                "value": values[t.name],
                "default": t.default,
                "configured": t.name in configured,
                "minimum": _number(t.minimum),
                "maximum": _number(t.maximum),
                "unit": t.unit,
                "description": t.description,
            }
            for t in rule.thresholds
        ],
    }


def _shown(value: float | None) -> str:
    return "unset" if value is None else f"{value:g}"


def catalogue_text(config: Config) -> str:
    """One line per rule, one per threshold with the value in effect (``configured`` when
    ``config`` overrides it, with the default), and the page's URL."""
    lines = []
    default_window = Config().rules_window
    if config.rules or config.rules_window != default_window:
        lines.append(f"# thresholds in effect with {config.source}")
    window = f"# rules.window = {config.rules_window:g} (seconds"
    if config.rules_window != default_window:
        window += f", configured; default {default_window:g}"
    lines.append(
        window + "): serve judges rising counters (Q02, Q04, C01, C02 ...) over this much of "
        "the recent polls, at least one interval"
    )
    for rule in RULES:
        override = config.rules.get(rule.id)
        header = f"{rule.id}  {rule.slug:<28} {rule.severity:<8} {rule.title}"
        if override is not None and not override.enabled:
            header += "  [disabled by config]"
        lines.append(header)
        configured = override.thresholds if override is not None else {}
        values = rule.threshold_values(configured)
        for t in rule.thresholds:
            unit = t.unit
            if t.name in configured:
                unit += f", configured; default {_shown(t.default)}"
            lines.append(
                f"      rules.{rule.id}.{t.name} = {_shown(values[t.name])} ({unit}): "
                f"{t.description}"
            )
        lines.append(f"      page: {doc_url(rule.doc, config.docs_url) or offline_page(rule.id)}")
    return "\n".join(lines) + "\n"
