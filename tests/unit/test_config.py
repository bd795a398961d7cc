"""The YAML configuration: every problem one line naming the file and the key path, all at once.

``parse_config``/``load_config`` are called directly with the real rule catalogue (the one
``tcpwatch`` validates against), so thresholds, bounds and rule ids are those users meet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tcpwatch.audit import audit, rule_settings
from tcpwatch.cli import rule_catalogue
from tcpwatch.config import (
    CollectSettings,
    Config,
    ConfigError,
    RuleCatalogue,
    RuleOverride,
    load_config,
    parse_config,
)
from tcpwatch.rules import RULES, RuleSettings
from tests.unit.snapshots import listener, snapshot, socket_table

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = "/etc/tcpwatch/config.yaml"
# The registry's ids (test_rules_engine pins the released ones: none may disappear).
ALL_RULE_IDS = tuple(rule.id for rule in RULES)


@pytest.fixture(scope="module")
def catalogue() -> RuleCatalogue:
    return rule_catalogue()


def errors_of(text: str, catalogue: RuleCatalogue, source: str = SOURCE) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source, catalogue)
    errors = caught.value.errors
    assert errors, "a ConfigError must carry at least one line"
    for line in errors:
        assert "\n" not in line, f"one problem, one line: {line!r}"
        assert line.startswith(f"{source}: "), f"every line names the file: {line!r}"
    assert str(caught.value) == "\n".join(errors)
    return errors


# -- what parses -----------------------------------------------------------------------------------


def test_empty_file_is_the_defaults(catalogue: RuleCatalogue) -> None:
    assert parse_config("", SOURCE, catalogue) == Config(source=SOURCE)
    assert parse_config("# only a comment\n", SOURCE, catalogue) == Config(source=SOURCE)


def test_the_shipped_example_is_valid_and_is_the_defaults(catalogue: RuleCatalogue) -> None:
    path = str(REPO_ROOT / "config.example.yaml")
    assert load_config(path, catalogue) == Config(source=path)


def test_every_section_parses(catalogue: RuleCatalogue) -> None:
    text = """
procfs: /host/proc
log_level: debug
listen: "127.0.0.1:9100"
interval: 30
web_config: /etc/tcpwatch/web.yml
namespaces: [host, "pod:shop/*"]
check:
  window: 2.5
collect:
  established: dumped
  process_attribution: false
  attribute_states: [close_wait, syn_sent]
  process_scan_timeout: 1.5
  top_processes: 5
  top_destinations: 0
rules:
  Q03: false
  S01:
    enabled: false
  Q01:
    warning: 0.7
    critical: 1
  K09:
    idle_timeout: 350
"""
    config = parse_config(text, SOURCE, catalogue)
    assert config == Config(
        source=SOURCE,
        procfs="/host/proc",
        log_level="debug",
        listen="127.0.0.1:9100",
        interval=30.0,
        web_config="/etc/tcpwatch/web.yml",
        check_window=2.5,
        namespaces=("host", "pod:shop/*"),
        collect=CollectSettings(
            established="dumped",
            process_attribution=False,
            attribute_states=("close_wait", "syn_sent"),
            process_scan_timeout=1.5,
            top_processes=5,
            top_destinations=0,
        ),
        rules={
            "Q03": RuleOverride(enabled=False),
            "S01": RuleOverride(enabled=False),
            "Q01": RuleOverride(thresholds={"warning": 0.7, "critical": 1.0}),
            "K09": RuleOverride(thresholds={"idle_timeout": 350.0}),
        },
    )


def test_namespaces_as_a_comma_separated_string(catalogue: RuleCatalogue) -> None:
    config = parse_config("namespaces: host, tw-*\n", SOURCE, catalogue)
    assert config.namespaces == ("host", "tw-*")


@pytest.mark.parametrize("bound", ["minimum", "maximum"])
def test_thresholds_accept_their_bounds(catalogue: RuleCatalogue, bound: str) -> None:
    lines = ["rules:"]
    for rule in RULES:
        if rule.thresholds:
            lines.append(f"  {rule.id}:")
            lines.extend(f"    {t.name}: {float(getattr(t, bound))!r}" for t in rule.thresholds)
    config = parse_config("\n".join(lines) + "\n", SOURCE, catalogue)
    for rule in RULES:
        for threshold in rule.thresholds:
            assert config.rules[rule.id].thresholds[threshold.name] == getattr(threshold, bound)


def test_catalogue_matches_the_rules() -> None:
    catalogue = rule_catalogue()
    assert sorted(catalogue) == sorted(ALL_RULE_IDS)
    for rule in RULES:
        assert catalogue[rule.id] == {
            t.name: (t.minimum, t.maximum, t.unit) for t in rule.thresholds
        }
        for threshold in rule.thresholds:
            if threshold.default is not None:
                assert threshold.minimum <= threshold.default <= threshold.maximum, threshold


# -- disabling rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["Q03: false", "Q03:\n    enabled: false"])
def test_disabled_rule_does_not_run(catalogue: RuleCatalogue, body: str) -> None:
    """A listener capped at somaxconn (128) with a half-full queue: Q03 unless disabled."""
    capped = snapshot(
        sysctl_overrides={"net.core.somaxconn": (128,)},
        sockets=socket_table([listener(8080, queue_length=100, queue_max=128, inode=7001)]),
    )
    config = parse_config(f"rules:\n  {body}\n", SOURCE, catalogue)
    assert rule_settings(config)["Q03"] == RuleSettings(enabled=False, thresholds={})
    enabled_ids = {f.rule_id for f in audit([capped], {}, {})}
    disabled_ids = {f.rule_id for f in audit([capped], {}, rule_settings(config))}
    assert "Q03" in enabled_ids  # the condition is there...
    assert disabled_ids == enabled_ids - {"Q03"}  # ...and only Q03 went quiet


def test_threshold_override_reaches_the_rule(catalogue: RuleCatalogue) -> None:
    somaxconn_1024 = snapshot(sysctl_overrides={"net.core.somaxconn": (1024,)})
    assert "K05" in {f.rule_id for f in audit([somaxconn_1024], {}, {})}
    config = parse_config("rules:\n  K05:\n    minimum: 1024\n", SOURCE, catalogue)
    assert "K05" not in {f.rule_id for f in audit([somaxconn_1024], {}, rule_settings(config))}


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_rule_id(catalogue: RuleCatalogue) -> None:
    (error,) = errors_of("rules:\n  Q99:\n    warning: 0.5\n", catalogue)
    assert error.startswith(f"{SOURCE}: rules.Q99: unknown rule id")
    assert all(rule_id in error for rule_id in ALL_RULE_IDS), "lists the known ids"


def test_rule_ids_are_case_sensitive(catalogue: RuleCatalogue) -> None:
    (error,) = errors_of("rules:\n  q01: false\n", catalogue)
    assert error.startswith(f"{SOURCE}: rules.q01: unknown rule id")


def test_wrong_threshold_type(catalogue: RuleCatalogue) -> None:
    (error,) = errors_of("rules:\n  Q01:\n    warning: high\n", catalogue)
    assert error == (
        f'{SOURCE}: rules.Q01.warning: expected a number between 0.01 and 1, got "high"'
    )


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        (
            "Q01:\n    warning: 1.5",
            "rules.Q01.warning: expected a number between 0.01 and 1, got 1.5",
        ),
        (
            "Q01:\n    critical: 0",
            "rules.Q01.critical: expected a number between 0.01 and 1, got 0",
        ),
        ("S01:\n    warning: -5", "rules.S01.warning: expected a number between 1 and "),
        ("K09:\n    idle_timeout: 0", "rules.K09.idle_timeout: expected a number between 1 and"),
        ("K08:\n    minimum_ports: 70000", "rules.K08.minimum_ports: expected a number between"),
        ("Q01:\n    warning: .nan", "rules.Q01.warning: expected a number between 0.01 and 1"),
        ("Q01:\n    warning: .inf", "rules.Q01.warning: expected a number between 0.01 and 1"),
        ("Q01:\n    warning: true", "rules.Q01.warning: expected a number between 0.01 and 1"),
        ("Q01:\n    warning: [0.5]", "rules.Q01.warning: expected a number between 0.01 and 1"),
        ("Q01:\n    warning:", "rules.Q01.warning: expected a number between 0.01 and 1"),
    ],
    ids=[
        "above",
        "below",
        "negative",
        "zero-seconds",
        "too-many-ports",
        "nan",
        "inf",
        "bool",
        "list",
        "empty",
    ],
)
def test_threshold_out_of_range_or_not_a_number(
    catalogue: RuleCatalogue, setting: str, shown: str
) -> None:
    (error,) = errors_of(f"rules:\n  {setting}\n", catalogue)
    assert error.startswith(f"{SOURCE}: {shown}"), error


def test_unknown_threshold_name(catalogue: RuleCatalogue) -> None:
    (error,) = errors_of("rules:\n  S01:\n    warn: 10\n", catalogue)
    assert error.startswith(f"{SOURCE}: rules.S01.warn: unknown setting for rule S01")
    assert "warning" in error and "stale_seconds" in error and "enabled" in error


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("rules:\n  Q01: 5\n", "rules.Q01: expected a mapping, got 5"),
        ("rules:\n  Q01: [warning]\n", "rules.Q01: expected a mapping"),
        ("rules: 5\n", "rules: expected a mapping, got 5"),
        ("rules:\n  Q01:\n    enabled: no-thanks\n", "rules.Q01.enabled: expected true or false"),
        ("- a\n- b\n", "(top level): expected a mapping"),
        ("just text\n", '(top level): expected a mapping, got "just text"'),
    ],
)
def test_wrong_shapes(catalogue: RuleCatalogue, text: str, shown: str) -> None:
    (error,) = errors_of(text, catalogue)
    assert error.startswith(f"{SOURCE}: {shown}"), error


def test_unknown_top_level_key(catalogue: RuleCatalogue) -> None:
    (error,) = errors_of("intervall: 10\n", catalogue)
    assert error.startswith(f"{SOURCE}: intervall: unknown key (known: ")
    assert "interval" in error and "rules" in error


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("check:\n  windoe: 3\n", "check.windoe: unknown key"),
        ("check:\n  window: 301\n", "check.window: expected a number between 0 and 300 seconds"),
        ("collect:\n  establish: dumped\n", "collect.establish: unknown key"),
        ("collect:\n  established: all\n", "collect.established: expected one of derived, dumped"),
        ("collect:\n  attribute_states: [established]\n", "collect.attribute_states[0]: "),
        ("collect:\n  top_processes: 2.5\n", "collect.top_processes: expected a whole number"),
        ("log_level: loud\n", "log_level: expected one of debug, info, warning, error"),
        ("interval: 0\n", "interval: expected a number between 1 and 3600 seconds"),
        ("procfs: ''\n", "procfs: expected a non-empty string"),
        ("namespaces: []\n", "namespaces: expected"),
    ],
)
def test_other_sections_name_their_key_path(
    catalogue: RuleCatalogue, text: str, shown: str
) -> None:
    (error,) = errors_of(text, catalogue)
    assert error.startswith(f"{SOURCE}: {shown}"), error


@pytest.mark.parametrize(
    "text",
    ["rules: [\n  Q01: {\n", "rules:\n  Q01:\n\twarning: 0.5\n", "a: b: c\n", "key: 'open\n"],
    ids=["unclosed", "tab", "nested-colon", "unterminated-quote"],
)
def test_malformed_yaml_names_file_and_line(catalogue: RuleCatalogue, text: str) -> None:
    (error,) = errors_of(text, catalogue)
    assert error.startswith(f"{SOURCE}: line "), error
    assert "not valid YAML" in error


def test_unsafe_yaml_tags_are_refused(catalogue: RuleCatalogue) -> None:
    (error,) = errors_of("procfs: !!python/object/apply:os.getcwd []\n", catalogue)
    assert "not valid YAML" in error


def test_several_errors_are_all_reported(catalogue: RuleCatalogue) -> None:
    text = """
intervall: 10
check:
  window: -1
collect:
  established: all
rules:
  Q99: {}
  Q01:
    warning: high
    critical: 7
  S01:
    nope: 3
"""
    errors = errors_of(text, catalogue)
    paths = [line[len(SOURCE) + 2 :].split(":", 1)[0] for line in errors]
    assert sorted(paths) == sorted(
        [
            "intervall",
            "check.window",
            "collect.established",
            "rules.Q99",
            "rules.Q01.warning",
            "rules.Q01.critical",
            "rules.S01.nope",
        ]
    ), errors


def test_missing_file(tmp_path: Path, catalogue: RuleCatalogue) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing), catalogue)
    assert caught.value.errors == [
        f"{missing}: cannot read the configuration file: No such file or directory"
    ]


def test_directory_instead_of_file(tmp_path: Path, catalogue: RuleCatalogue) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path), catalogue)
    (error,) = caught.value.errors
    assert error.startswith(f"{tmp_path}: cannot read the configuration file: ")


def test_file_that_is_not_utf8(tmp_path: Path, catalogue: RuleCatalogue) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\xe9glages\ninterval: 10\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), catalogue)
    (error,) = caught.value.errors
    assert error.startswith(f"{path}: ")
    assert "UTF-8" in error
