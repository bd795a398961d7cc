"""YAML configuration -> frozen Config. Validation collects every error with its key path."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tcpwatch.logformat import LOG_FORMATS, LOG_LEVELS
from tcpwatch.model import STATES
from tcpwatch.validation import (
    ConfigError,
    Validator,
    one_line,
    read_config_file,
    show,
)

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "parse_namespaces"]

ESTABLISHED_METHODS = ("derived", "dumped")
# States whose sockets carry an inode in the cheap dumps (ESTABLISHED is counted, not dumped;
# TIME_WAIT and request sockets have no owner).
ATTRIBUTABLE_STATES = tuple(s for s in STATES if s not in ("established", "time_wait", "listen"))
# collect.connection_receive_buffer: 64 KiB (about 100 queued events once doubled) to 256 MiB.
MIN_RECEIVE_BUFFER = 64 << 10
MAX_RECEIVE_BUFFER = 256 << 20
# collect.tracepoint_buffer, per CPU: 8 KiB (2 pages) to 64 MiB.
MIN_TRACEPOINT_BUFFER = 8 << 10
MAX_TRACEPOINT_BUFFER = 64 << 20
# Where a site publishes the docs: a finding's page is then <docs_url>/docs/rules/<ID>-<slug>.md.
# None by default: tcpwatch has no published home, so links go to what every install has
# (`tcpwatch rules ID`, serve's /rules/ID, /usr/share/doc/tcpwatch in the Debian package).
DEFAULT_DOCS_URL = ""


@dataclass(frozen=True, slots=True)
class CollectSettings:
    """What a poll collects and how (the `collect:` section)."""

    established: str = "derived"
    process_attribution: bool = True
    attribute_states: tuple[str, ...] = ("close_wait",)
    process_scan_timeout: float = 5.0
    # serve: seconds between per-destination scans (ESTABLISHED sockets on ephemeral ports are
    # copied out only for them); polls in between reuse the latest. 0 = every poll.
    destinations_interval: float = 60.0
    top_processes: int = 20
    top_destinations: int = 20
    disabled_sources: tuple[str, ...] = ()  # source names (tcpwatch_source_up) not to run
    # The destroy-event source (docs/connections.md): on/off, the host-wide budget of per-peer
    # rows (every namespace together, "other" rows included; 26 series a row) and the idle time,
    # and the receive buffer asked for (the kernel doubles it).
    connections: bool = True
    connection_peers: int = 115  # x 26 series a row: 2,990 (docs/metrics.md)
    connection_peer_idle: float = 3600.0
    connection_receive_buffer: int = 4 << 20
    live_tcp_info: bool = True  # tcp_info of live connections on the per-destination scan
    # The listeners' live connections read per scan (source "inbound", on the per-destination
    # cadence); 0 turns the scan off.
    inbound_connections: int = 2048
    live_peers: int = 30  # host-wide rows of the tcpwatch_live_* gauges, slowest first
    # The kernel's TCP tracepoints (docs/tracepoints.md): on/off, ring buffer bytes per CPU.
    tracepoints: bool = True
    tracepoint_buffer: int = 0  # 0: 8 MiB over the CPUs, at least 512 KiB each


@dataclass(frozen=True, slots=True)
class RuleOverride:
    """`rules.<ID>:` as written in the file: validated against the rule catalogue by the caller."""

    enabled: bool = True
    thresholds: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<defaults>"
    procfs: str = "/proc"
    rootfs: str = "/"  # the host's root: its /etc/sysctl.conf and sysctl.d (--path.rootfs)
    log_level: str = "info"
    log_format: str = "logfmt"
    docs_url: str = DEFAULT_DOCS_URL
    listen: str = ":9477"
    interval: float = 15.0
    web_config: str | None = None
    check_window: float = 5.0
    # serve: rules about rising counters judge this much of the recent polls (`rules.window`),
    # at least one interval (shorter means: the last interval).
    rules_window: float = 60.0
    namespaces: tuple[str, ...] = ("self",)  # ("self",), ("all",) or name patterns
    collect: CollectSettings = field(default_factory=CollectSettings)
    rules: Mapping[str, RuleOverride] = field(default_factory=dict)


# A rule catalogue lookup for validation: rule id -> {threshold name: (minimum, maximum, unit)}.
RuleCatalogue = Mapping[str, Mapping[str, tuple[float, float, str]]]


def load_config(
    path: str, catalogue: RuleCatalogue | None = None, sources: Collection[str] | None = None
) -> Config:
    """Read and validate a YAML file; raises ConfigError with every problem found.

    The file is read within the bounds of :func:`tcpwatch.validation.read_config_file` (a regular
    file, at most 1 MiB, never blocking) and parsed by the bounded loader (no aliases, bounded
    nesting and size).
    """
    return parse_config(read_config_file(path, "configuration file"), path, catalogue, sources)


def parse_config(
    text: str,
    source: str,
    catalogue: RuleCatalogue | None = None,
    sources: Collection[str] | None = None,
) -> Config:
    """``catalogue`` (rule thresholds) and ``sources`` (names that may be disabled) validate
    what names them; without them any name is taken."""
    from tcpwatch.yamlload import load_yaml  # PyYAML only when a file is read

    raw = load_yaml(text, source)
    check = Validator(source)
    top = check.mapping(raw, "(top level)")
    if top is None:
        raise ConfigError(check.errors)
    setters: dict[str, Callable[[object, str], object]] = {
        "procfs": check.file_path,
        "rootfs": check.file_path,
        "log_level": lambda v, p: check.choice(v, p, LOG_LEVELS),
        "log_format": lambda v, p: check.choice(v, p, LOG_FORMATS),
        "docs_url": lambda v, p: _docs_url(check, v, p),
        "listen": check.string,
        "interval": lambda v, p: check.duration(v, p, 1, 3600),
        "web_config": check.file_path,
    }
    check.unknown_keys(top, {*setters, "namespaces", "collect", "check", "rules"}, "")
    values: dict[str, Any] = {"source": source}
    for key, parse in setters.items():
        if key in top:
            parsed = parse(top[key], key)
            if parsed is not None:
                values[key] = parsed
    check_section = check.mapping(top.get("check"), "check")
    if check_section is not None:
        check.unknown_keys(check_section, {"window"}, "check")
        if "window" in check_section:
            window = check.duration(check_section["window"], "check.window", 0, 300)
            if window is not None:
                values["check_window"] = window
    if "namespaces" in top:
        selection = parse_namespaces(top["namespaces"])
        if selection is None:
            check.error(
                "namespaces",
                'expected "self", "all" or a list of namespace names or patterns, '
                f"got {show(top['namespaces'])}",
            )
        else:
            values["namespaces"] = selection
    values["collect"] = _collect(check, top.get("collect"), sources)
    rules_section = top.get("rules")
    if isinstance(rules_section, dict) and "window" in rules_section:
        rules_section = dict(rules_section)
        window = check.duration(rules_section.pop("window"), "rules.window", 1, 86400)
        if window is not None:
            values["rules_window"] = window
    values["rules"] = _rules(check, rules_section, catalogue)
    if check.errors:
        raise ConfigError(check.errors)
    return Config(**values)


def _docs_url(check: Validator, raw: object, path: str) -> str | None:
    if raw == "":
        return ""  # explicitly none: the default
    url = check.string(raw, path)
    if url is None:
        return None
    if not url.startswith(("https://", "http://")) or any(c.isspace() for c in url):
        check.error(path, f"expected an http(s):// URL without spaces, got {show(url)}")
        return None
    return url.rstrip("/")


def parse_namespaces(raw: object) -> tuple[str, ...] | None:
    """`namespaces:` / --netns: "self", "all", a comma-separated string or a list of patterns."""
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",")]
    if not isinstance(raw, list) or not raw:
        return None
    if not all(isinstance(item, str) and item for item in raw):
        return None
    return tuple(raw)


def _source_names(
    check: Validator, raw: object, path: str, sources: Collection[str] | None
) -> tuple[str, ...] | None:
    if not isinstance(raw, list):
        check.error(path, f"expected a list of source names, got {show(raw)}")
        return None
    names: list[str] = []
    for i, name in enumerate(raw):
        if sources is not None:
            chosen = check.choice(name, f"{path}[{i}]", tuple(sources))
        else:
            chosen = check.string(name, f"{path}[{i}]")
        if chosen is not None:
            names.append(chosen)
    return tuple(names)


def _collect(check: Validator, raw: object, sources: Collection[str] | None) -> CollectSettings:
    section = check.mapping(raw, "collect")
    settings = CollectSettings()
    if not section:
        return settings
    known = {
        "established",
        "process_attribution",
        "attribute_states",
        "process_scan_timeout",
        "destinations_interval",
        "top_processes",
        "top_destinations",
        "disabled_sources",
        "connections",
        "connection_peers",
        "connection_peer_idle",
        "connection_receive_buffer",
        "live_tcp_info",
        "inbound_connections",
        "live_peers",
        "tracepoints",
        "tracepoint_buffer",
    }
    check.unknown_keys(section, known, "collect")
    changes: dict[str, Any] = {}
    if "established" in section:
        changes["established"] = check.choice(
            section["established"], "collect.established", ESTABLISHED_METHODS
        )
    if "process_attribution" in section:
        changes["process_attribution"] = check.boolean(
            section["process_attribution"], "collect.process_attribution"
        )
    if "attribute_states" in section:
        states = section["attribute_states"]
        if not isinstance(states, list):
            check.error("collect.attribute_states", f"expected a list, got {show(states)}")
        else:
            chosen = [
                check.choice(state, f"collect.attribute_states[{i}]", ATTRIBUTABLE_STATES)
                for i, state in enumerate(states)
            ]
            changes["attribute_states"] = tuple(s for s in chosen if s is not None)
    if "process_scan_timeout" in section:
        changes["process_scan_timeout"] = check.duration(
            section["process_scan_timeout"], "collect.process_scan_timeout", 0.1, 120
        )
    if "destinations_interval" in section:
        changes["destinations_interval"] = check.duration(
            section["destinations_interval"], "collect.destinations_interval", 0, 3600
        )
    for key in ("top_processes", "top_destinations", "live_peers"):
        if key in section:
            changes[key] = check.integer(section[key], f"collect.{key}", 0, 10_000)
    if "inbound_connections" in section:
        changes["inbound_connections"] = check.integer(
            section["inbound_connections"], "collect.inbound_connections", 0, 1_000_000
        )
    for key in ("connections", "live_tcp_info", "tracepoints"):
        if key in section:
            changes[key] = check.boolean(section[key], f"collect.{key}")
    if "connection_peers" in section:
        changes["connection_peers"] = check.integer(
            section["connection_peers"], "collect.connection_peers", 0, 10_000
        )
    if "connection_peer_idle" in section:
        changes["connection_peer_idle"] = check.duration(
            section["connection_peer_idle"], "collect.connection_peer_idle", 1, 7 * 86400
        )
    if "connection_receive_buffer" in section:
        changes["connection_receive_buffer"] = check.integer(
            section["connection_receive_buffer"],
            "collect.connection_receive_buffer",
            MIN_RECEIVE_BUFFER,
            MAX_RECEIVE_BUFFER,
        )
    if "tracepoint_buffer" in section and section["tracepoint_buffer"] != 0:
        changes["tracepoint_buffer"] = check.integer(
            section["tracepoint_buffer"],
            "collect.tracepoint_buffer",
            MIN_TRACEPOINT_BUFFER,
            MAX_TRACEPOINT_BUFFER,
        )
    if "disabled_sources" in section:
        changes["disabled_sources"] = _source_names(
            check, section["disabled_sources"], "collect.disabled_sources", sources
        )
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})


def _rules(
    check: Validator, raw: object, catalogue: RuleCatalogue | None
) -> dict[str, RuleOverride]:
    section = check.mapping(raw, "rules")
    overrides: dict[str, RuleOverride] = {}
    if not section:
        return overrides
    for rule_id, body in section.items():
        path = f"rules.{rule_id}"  # clipped to one short line by Validator.error
        known = catalogue.get(str(rule_id)) if catalogue is not None else None
        if catalogue is not None and known is None:
            check.error(path, f"unknown rule id (known: {', '.join(sorted(catalogue))})")
            continue
        if isinstance(body, bool):  # `Q03: false` disables a rule
            overrides[str(rule_id)] = RuleOverride(enabled=body)
            continue
        entries = check.mapping(body, path)
        if entries is None:
            continue
        enabled = True
        thresholds: dict[str, float | None] = {}
        for key, value in entries.items():
            key_path = f"{path}.{key}"
            if key == "enabled":
                parsed_flag = check.boolean(value, key_path)
                enabled = parsed_flag if parsed_flag is not None else enabled
                continue
            if known is not None and key not in known:
                names = ", ".join(["enabled", *sorted(known)])
                rule = one_line(str(rule_id), 20)
                check.error(key_path, f"unknown setting for rule {rule} (known: {names})")
                continue
            low, high, unit = known[key] if known is not None else (-math.inf, math.inf, "")
            if unit == "seconds":  # the one duration syntax: 30, "30s", "1m"
                parsed = check.duration(value, key_path, low, high)
            else:
                parsed = check.number(value, key_path, low, high)
            if parsed is not None:
                thresholds[str(key)] = parsed
        overrides[str(rule_id)] = RuleOverride(enabled=enabled, thresholds=thresholds)
    return overrides
