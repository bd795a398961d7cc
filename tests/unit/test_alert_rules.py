"""The Prometheus rule files in deploy/prometheus/, checked by promtool and against the docs.

``promtool check rules`` validates them, ``promtool test rules`` runs their unit tests
(tcpwatch-alerts.test.yml: synthetic series for each alert), and the checks below hold the files
to the project's conventions: a severity and a working runbook link on every alert, a firing and a
silent test case for every alert, a test for every recording rule, and only documented metrics.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_dashboard import undocumented_use

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "tcpwatch-alerts.yml"
RECORDING = PROMETHEUS_DIR / "tcpwatch-recording.yml"
RULE_TESTS = PROMETHEUS_DIR / "tcpwatch-alerts.test.yml"
# The fleet groups' cases (per node, per destination) have a file of their own.
RECORDING_TESTS = PROMETHEUS_DIR / "tcpwatch-recording.test.yml"
SCRAPE_EXAMPLE = PROMETHEUS_DIR / "scrape-config.example.yml"
KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
FLEET_DOC = REPO / "docs" / "fleet.md"
SEVERITIES = frozenset({"critical", "warning", "info"})
# runbook_url: the site's published copy when it defines tcpwatch:docs_url:info, else a page the
# user has (the reporting tcpwatch's own rule page, Prometheus' targets page).
RUNBOOK = re.compile(
    r'\{\{ with query "tcpwatch:docs_url:info" \}\}\{\{ label "url" \(first \.\) \}\}'
    r"/(?P<path>.+?)\{\{ else \}\}(?P<fallback>.+)\{\{ end \}\}"
)
FALLBACK = re.compile(r"(http://\{\{ \$labels\.instance \}\}|\{\{ \$externalURL \}\})/.*")


@cache
def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        loaded: dict[str, Any] = yaml.safe_load(handle)
    return loaded


def rules_of(path: Path) -> Iterator[dict[str, Any]]:
    for group in _load(path)["groups"]:
        yield from group["rules"]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules_of(ALERTS) if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is not on PATH (Debian package prometheus)"
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS_DIR,
        check=False,
    )


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, - for spaces.

    >>> github_anchor("TcpwatchDown: no scrapes")
    'tcpwatchdown-no-scrapes'
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [ALERTS, RECORDING], ids=lambda path: path.name)
def test_promtool_check_rules(path: Path) -> None:
    result = promtool("check", "rules", path.name)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(1 for _ in rules_of(path))
    assert f"SUCCESS: {count} rules found" in result.stdout


@pytest.mark.parametrize("path", [RULE_TESTS, RECORDING_TESTS], ids=lambda path: path.name)
def test_promtool_test_rules(path: Path) -> None:
    result = promtool("test", "rules", path.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_tests_load_both_rule_files() -> None:
    assert set(_load(RULE_TESTS)["rule_files"]) == {ALERTS.name, RECORDING.name}


def test_scrape_config_example_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", SCRAPE_EXAMPLE.name)
    assert result.returncode == 0, result.stdout + result.stderr
    config = _load(SCRAPE_EXAMPLE)
    assert set(config["rule_files"]) == {ALERTS.name, RECORDING.name}
    # The tcpwatch-self alerts select this job name.
    assert "tcpwatch" in {job["job_name"] for job in config["scrape_configs"]}
    self_alerts = [a for a in alerts() if a["expr"].lstrip().startswith(("up{", "absent(up{"))]
    assert self_alerts and all('job="tcpwatch"' in a["expr"] for a in self_alerts)


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        link = RUNBOOK.fullmatch(annotations["runbook_url"])
        assert link is not None, f"{name}: runbook_url {annotations['runbook_url']!r}"
        assert FALLBACK.fullmatch(link["fallback"]), f"{name}: {link['fallback']!r}"
        assert re.fullmatch(r"\d+[smh]", alert["for"]), f"{name}: for {alert.get('for')!r}"


def test_runbook_links_resolve_to_existing_pages_and_headings() -> None:
    fleet_anchors = {
        github_anchor(line.lstrip("#"))
        for line in FLEET_DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for alert in alerts():
        link = RUNBOOK.fullmatch(alert["annotations"]["runbook_url"])
        assert link is not None, alert["alert"]
        path, _, anchor = link["path"].partition("#")
        fallback = link["fallback"]
        if "{{" in path:
            # Templated from the finding's labels; promtool test rules checks the rendering.
            assert path == "docs/rules/{{ $labels.id }}-{{ $labels.slug }}.md", alert["alert"]
            assert fallback == "http://{{ $labels.instance }}/rules/{{ $labels.id }}"
            continue
        assert (REPO / path).is_file(), f"{alert['alert']}: runbook {path} does not exist"
        if anchor:
            assert anchor in fleet_anchors, f"{alert['alert']}: no heading #{anchor} in {path}"
        rule = re.fullmatch(r"docs/rules/([A-Z]\d\d)-[a-z0-9-]+\.md", path)
        if rule is not None:
            # The same page, as the reporting tcpwatch serves it (tcpwatch/render/rulepage.py).
            assert fallback == f"http://{{{{ $labels.instance }}}}/rules/{rule.group(1)}"


def rule_of(alert: dict[str, Any]) -> str | None:
    """The rule whose page is the alert's runbook, if any."""
    link = RUNBOOK.fullmatch(alert["annotations"]["runbook_url"])
    found = re.fullmatch(r"docs/rules/([A-Z]\d\d)-[a-z0-9-]+\.md", link["path"]) if link else None
    return found.group(1) if found else None


def test_runbook_pages_exist_for_every_rule_the_templated_link_can_name() -> None:
    from tcpwatch.rules import RULES

    missing = [rule.doc for rule in RULES if not (REPO / rule.doc).is_file()]
    assert missing == []


def test_every_alert_has_a_firing_and_a_silent_test_case() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in _load(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert sorted(names - firing) == [], "alerts never tested firing"
    assert sorted(names - silent) == [], "alerts never tested staying silent"


def test_every_recording_rule_is_tested() -> None:
    tested = {
        re.match(r"[\w:]+", check["expr"]).group()  # type: ignore[union-attr]
        for path in (RULE_TESTS, RECORDING_TESTS)
        for case in _load(path)["tests"]
        for check in case.get("promql_expr_test", [])
    }
    records = {rule["record"] for rule in rules_of(RECORDING)}
    assert sorted(records - tested) == []


def test_rules_use_only_documented_metrics_and_labels() -> None:
    # A ratio rule reads the rates recorded before it in its group.
    recorded = tuple(f"metric {rule['record']} " for rule in rules_of(RECORDING))
    problems = [
        f"{rule.get('alert') or rule.get('record')}: {problem}"
        for path in (ALERTS, RECORDING)
        for rule in rules_of(path)
        for problem in undocumented_use(rule["expr"])
        if not problem.startswith(recorded)
    ]
    assert problems == []


def test_alert_names_are_unique_per_severity() -> None:
    keys = [(alert["alert"], alert["labels"]["severity"]) for alert in alerts()]
    assert len(keys) == len(set(keys))


def test_kubernetes_daemonset_config_and_its_scrape_job_agree() -> None:
    """The DaemonSet's args and config are what tcpwatch accepts; the scrape job finds its pods.

    Debian's promtool lacks Kubernetes service discovery, so the scrape job is checked here.
    """
    from tcpwatch.cli import build_parser, rule_catalogue
    from tcpwatch.config import parse_config

    with (KUBERNETES_DIR / "tcpwatch-daemonset.yml").open(encoding="utf-8") as handle:
        documents = {document["kind"]: document for document in yaml.safe_load_all(handle)}
    config_text = documents["ConfigMap"]["data"]["config.yaml"]
    config = parse_config(config_text, "ConfigMap tcpwatch", rule_catalogue())
    pod = documents["DaemonSet"]["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostNetwork"] and spec["hostPID"]
    [container] = spec["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve" and args.config == "/etc/tcpwatch/config.yaml"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/tcpwatch"
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities == {"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_READ_SEARCH", "PERFMON"]}
    [port] = container["ports"]
    assert f":{port['containerPort']}" == config.listen
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in ("/-/ready", "/-/healthy")

    scrape = _load(KUBERNETES_DIR / "prometheus-scrape-config.yml")
    [job] = scrape["scrape_configs"]
    relabel = job["relabel_configs"]
    keeps = {
        rule["source_labels"][0]: rule["regex"] for rule in relabel if rule.get("action") == "keep"
    }
    assert keeps["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    assert annotations["prometheus.io/scrape"] == "true"
    app = pod["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keeps["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == app
    namespaces = job["kubernetes_sd_configs"][0]["namespaces"]["names"]
    assert documents["Namespace"]["metadata"]["name"] in namespaces
    # The alert rules select job="tcpwatch".
    assert {"target_label": "job", "replacement": "tcpwatch"} in relabel
    address = next(rule for rule in relabel if rule.get("target_label") == "__address__")
    rewritten = re.sub(
        address["regex"], address["replacement"].replace("$", "\\"), "10.0.0.5:80;9477"
    )
    assert rewritten == "10.0.0.5:9477"


def test_generic_critical_alert_excludes_the_rules_with_their_own_critical_alert() -> None:
    """One page per problem: a rule whose page is the runbook of a dedicated critical alert is
    left out of TcpwatchCriticalFinding (promtool test rules proves the silence)."""
    from tcpwatch.rules import RULES

    generic = next(a for a in alerts() if a["alert"] == "TcpwatchCriticalFinding")
    match = re.search(r'id!~"([A-Z0-9|]+)"', generic["expr"])
    assert match is not None, generic["expr"]
    excluded = set(match.group(1).split("|"))
    own = {
        rule
        for alert in alerts()
        if alert["alert"] != "TcpwatchCriticalFinding" and alert["labels"]["severity"] == "critical"
        if (rule := rule_of(alert))
    }
    assert own == {"Q01", "K01", "P01"}
    # Q04's critical case (SYNs dropped) is TcpwatchSynQueueDrops' condition too.
    assert excluded == own | {"Q04"}
    assert excluded <= {rule.id for rule in RULES}


def test_warning_findings_have_their_alert_except_rules_with_their_own() -> None:
    """Issue 22 item 5: warning findings alert too, through TcpwatchWarningFinding, which leaves
    out the rules whose page is the runbook of a warning alert of their own (one problem, one
    alert; promtool test rules proves both halves)."""
    from tcpwatch.rules import RULES

    generic = next(a for a in alerts() if a["alert"] == "TcpwatchWarningFinding")
    assert generic["labels"] == {"severity": "warning"}
    assert 'severity="warning"' in generic["expr"]
    match = re.search(r'id!~"([A-Z0-9|]+)"', generic["expr"])
    assert match is not None, generic["expr"]
    excluded = set(match.group(1).split("|"))
    own = {
        rule
        for alert in alerts()
        if alert["alert"] != "TcpwatchWarningFinding" and alert["labels"]["severity"] == "warning"
        if (rule := rule_of(alert))
    }
    assert excluded == own
    assert own == {"Q01", "Q02", "Q04", "P01", "S01", "C01", "C02"}
    warning_rules = {rule.id for rule in RULES if rule.severity == "warning"}
    assert warning_rules - excluded, "some warning rule must still reach the generic alert"


def test_every_source_state_has_an_alert() -> None:
    """Failing sources warn; degraded ones (up, with fields left out) are info (issue 16 item 5)."""
    by_expr = {alert["expr"].strip(): alert for alert in alerts()}
    assert by_expr["tcpwatch_source_up == 0"]["labels"]["severity"] == "warning"
    assert by_expr["tcpwatch_source_degraded > 0"]["labels"]["severity"] == "info"


ALERTMANAGER_EXAMPLE = PROMETHEUS_DIR / "alertmanager.example.yml"


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("amtool")
    assert binary is not None, "amtool is not on PATH (Debian package prometheus-alertmanager)"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR, check=False
    )


def test_alertmanager_example_routes_warning_findings_apart_from_pages() -> None:
    """Every tcpwatch alert reaches a receiver through the example routing; critical alerts page,
    TcpwatchWarningFinding goes to its own ticket route, grouped by rule across hosts."""
    checked = amtool("check-config", ALERTMANAGER_EXAMPLE.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    receivers: dict[str, set[str]] = {}
    for alert in alerts():
        labels = [f"alertname={alert['alert']}", f"severity={alert['labels']['severity']}"]
        routed = amtool(
            "config", "routes", "test", f"--config.file={ALERTMANAGER_EXAMPLE.name}", *labels
        )
        assert routed.returncode == 0, routed.stdout + routed.stderr
        (receiver,) = routed.stdout.split()
        receivers.setdefault(receiver, set()).add(alert["alert"])
    critical = {a["alert"] for a in alerts() if a["labels"]["severity"] == "critical"}
    assert receivers["pager"] == critical
    assert "TcpwatchWarningFinding" in receivers["tickets"]
    assert not receivers["tickets"] & critical
    route = _load(ALERTMANAGER_EXAMPLE)["route"]
    [own] = [r for r in route["routes"] if r["matchers"] == ['alertname="TcpwatchWarningFinding"']]
    assert own["group_by"] == ["alertname", "id"]
