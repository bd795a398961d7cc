"""tcpwatch, a real Prometheus, the shipped alert rules and the dashboard's queries, end to end.

Inside a throw-away network namespace: ``tcpwatch serve --interval 1`` on loopback and a
Prometheus (Debian's ``prometheus``) scraping it every second with the alert rules and the
recording rules loaded. The alert rules are a test copy with every ``for:`` cut to 1 s; the shipped
file is unchanged. Then:

- an unhealthy population (a full accept queue with overflowing connects, a growing CLOSE_WAIT
  leak held by a named process, a SYN flood answered with syncookies and another dropped with
  syncookies off, ephemeral ports to one destination at 82% of a narrowed range) brings every
  alert about it to pending or firing, with the right labels; every query of every dashboard panel
  (template variables substituted) returns data; every rule evaluates without error;
  ``promtool check metrics`` accepts the live exposition; stopping tcpwatch raises TcpwatchDown;
- a healthy population (established connections, TIME_WAIT) raises no alert at all.

Prometheus is queried from inside the namespace (one short Python process per batch of URLs), so
nothing listens outside it. Every process is killed and every directory removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import populations
from tests.integration.churn import start_churn
from tests.integration.netns import Netns
from tests.unit.test_dashboard import (
    load_dashboard,
    panel_queries,
    selectors,
    selects_host_only_sysctls,
    substitute,
    template_variables,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
TCPWATCH_ADDRESS = "127.0.0.1:9477"
PROMETHEUS_ADDRESS = "127.0.0.1:9090"
PROMETHEUS_URL = f"http://{PROMETHEUS_ADDRESS}"
TCPWATCH = (sys.executable, "-m", "tcpwatch")
LIFETIME = 400.0  # hard cap on every process this test starts, in seconds
START_TIMEOUT = 60.0
ALERT_TIMEOUT = 120.0
# Grafana's variables as a 1-second scrape interval makes them.
GRAFANA_INTERVALS: Mapping[str, str] = {
    "__rate_interval": "4s",
    "__interval": "1s",
    "__range": "1m",
}

# Ports: listeners below the narrowed ephemeral range (40000-43999), one per population.
POOL_PORT = 20001
CLOSE_WAIT_PORTS = (20005, 20015)
ACCEPT_QUEUE_PORT = 20008
SYN_COOKIE_PORT = 20020
SYN_DROP_PORT = 20021
FD_LIMITED_PORT = 20040
CHURN_PORT = 20030  # 20030 ok, 20031 refused, 20032 SYNs dropped, 20033 15% of segments dropped
PORT_RANGE = (40000, 43999)  # 4000 ports, ends of different parity (rule K08 stays quiet on that)
POOL_PAIRS = 3300  # 82.5% of the range to one destination: the critical level (80%)
LEAKER = "tw-leaker"
PER_HOST_SCALES = frozenset({"tcpwatch_page_size_bytes"})

# The shipped rules the unhealthy population must raise, and those it must not.
UNHEALTHY_ALERTS = frozenset(
    {
        "TcpwatchCriticalFinding",
        "TcpwatchAcceptQueueSaturated",
        "TcpwatchAcceptQueueFilling",
        "TcpwatchListenOverflowsRising",
        "TcpwatchSynQueuePressure",
        "TcpwatchSynFloodSigns",
        "TcpwatchSynQueueDrops",
        "TcpwatchEphemeralPortsNearlyExhausted",
        "TcpwatchCloseWaitGrowing",
        "TcpwatchConnectFailures",
        "TcpwatchRetransmissionRatioHigh",
    }
)
SELF_ALERTS = frozenset(
    {"TcpwatchDown", "TcpwatchAbsent", "TcpwatchStale", "TcpwatchSourceFailing"}
)

# A listener with a small backlog whose clients' final ACKs an nft rule drops: its SYN queue
# fills with request sockets and later SYNs get syncookies (or, with syncookies off, are dropped).
SYN_FLOOD = r"""
import socket, sys, time
port, backlog, clients = (int(arg) for arg in sys.argv[1:4])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(backlog)
held = [listener]
for _ in range(clients):
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", port))
    held.append(client)
print("ready", flush=True)
time.sleep(600)
"""

# Fetches URLs inside the namespace and prints [{"status": ..., "body": ...}, ...] as JSON.
FETCH = r"""
import json, sys, urllib.error, urllib.request
answers = []
for url in json.loads(sys.argv[1]):
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            answers.append({"status": response.status, "body": response.read().decode()})
    except urllib.error.HTTPError as error:
        answers.append({"status": error.code, "body": error.read().decode()})
    except OSError as error:
        answers.append({"status": None, "body": str(error)})
print(json.dumps(answers))
"""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Stack:
    """tcpwatch and Prometheus running in ``ns``."""

    ns: Netns
    tcpwatch: subprocess.Popen[str]
    prometheus: subprocess.Popen[str]

    def fetch(self, urls: Sequence[str]) -> list[Answer]:
        if not urls:
            return []
        result = self.ns.run(sys.executable, "-c", FETCH, json.dumps(list(urls)), timeout=120)
        return [Answer(item["status"], item["body"]) for item in json.loads(result.stdout)]

    def api(self, path: str, **params: str) -> Any:
        """One Prometheus API call; fails the test with Prometheus' answer unless it succeeded."""
        [answer] = self.fetch([api_url(path, **params)])
        return api_data(answer, path)

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("/api/v1/alerts")["alerts"]
        return alerts

    def diagnostics(self) -> str:
        return (
            f"\n--- tcpwatch stderr:\n{self.ns.stderr_of(self.tcpwatch)[-2000:]}"
            f"\n--- prometheus stderr:\n{self.ns.stderr_of(self.prometheus)[-2000:]}"
        )


def api_url(path: str, **params: str) -> str:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    return f"{PROMETHEUS_URL}{path}{query}"


def api_data(answer: Answer, what: str) -> Any:
    assert answer.status == 200, f"{what}: HTTP {answer.status}: {answer.body[:1000]}"
    payload = answer.json()
    assert payload["status"] == "success", f"{what}: {payload}"
    return payload["data"]


def wait_for(what: str, check: Callable[[], bool], timeout: float, stack: Stack | None) -> None:
    """Poll ``check`` every half second until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            details = stack.diagnostics() if stack is not None else ""
            pytest.fail(f"{what}: not reached within {timeout:.0f} s{details}")
        time.sleep(0.5)


def shortened_rules(for_duration: str = "1s") -> tuple[dict[str, Any], dict[str, Any]]:
    """The shipped alert and recording rules, with every ``for:`` and group interval shortened."""
    with (PROMETHEUS_DIR / "tcpwatch-alerts.yml").open(encoding="utf-8") as handle:
        alerts: dict[str, Any] = yaml.safe_load(handle)
    with (PROMETHEUS_DIR / "tcpwatch-recording.yml").open(encoding="utf-8") as handle:
        recording: dict[str, Any] = yaml.safe_load(handle)
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule["for"] = for_duration
    for group in recording["groups"]:
        group["interval"] = "1s"
    return alerts, recording


def require_tools() -> None:
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: install Debian's prometheus package")


@contextmanager
def running_stack(ns: Netns) -> Iterator[Stack]:
    """tcpwatch and Prometheus inside ``ns``, ready and with a few scrapes stored."""
    require_tools()
    with tempfile.TemporaryDirectory(prefix=f"{ns.name}-prometheus-") as workdir:
        work = Path(workdir)
        alerts, recording = shortened_rules()
        (work / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
        (work / "recording.yml").write_text(yaml.safe_dump(recording, sort_keys=False))
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["alerts.yml", "recording.yml"],
            "scrape_configs": [
                {"job_name": "tcpwatch", "static_configs": [{"targets": [TCPWATCH_ADDRESS]}]}
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        tcpwatch = ns.spawn(
            [*TCPWATCH, "serve", "--listen", TCPWATCH_ADDRESS, "--interval", "1"],
            lifetime=LIFETIME,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=str(REPO),
        )
        prometheus = ns.spawn(
            [
                "prometheus",
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={PROMETHEUS_ADDRESS}",
                "--log.level=warn",
            ],
            lifetime=LIFETIME,
            cwd=workdir,
        )
        stack = Stack(ns, tcpwatch, prometheus)
        try:
            ready = [f"http://{TCPWATCH_ADDRESS}/-/ready", f"{PROMETHEUS_URL}/-/ready"]
            wait_for(
                "tcpwatch and Prometheus ready",
                lambda: all(answer.status == 200 for answer in stack.fetch(ready)),
                START_TIMEOUT,
                stack,
            )
            wait_for(
                "three successful scrapes of tcpwatch",
                lambda: (
                    bool(stack.query('count_over_time(up{job="tcpwatch"}[1m]) >= 3'))
                    and bool(stack.query('up{job="tcpwatch"} == 1'))
                ),
                START_TIMEOUT,
                stack,
            )
            yield stack
        finally:
            # Prometheus first, so it stops writing before its directory is removed.
            ns.stop(prometheus)
            ns.stop(tcpwatch)


def start_syn_flood(ns: Netns, port: int, backlog: int = 8, clients: int = 30) -> None:
    """A SYN_FLOOD helper on ``port`` with the handshakes' final ACKs dropped."""
    ns.nft(
        f"table inet tw_syn_{port} {{\n"
        f"  chain input {{ type filter hook input priority 0; "
        f"tcp dport {port} tcp flags & (syn|ack|fin|rst) == ack drop; }}\n"
        f"}}\n"
    )
    helper = ns.spawn(
        [sys.executable, "-c", SYN_FLOOD, str(port), str(backlog), str(clients)],
        lifetime=LIFETIME,
    )
    line = ns.read_line(helper, timeout=30)
    assert line == "ready", f"SYN flood helper said {line!r}: {ns.stderr_of(helper)}"


def collect_alerts(
    stack: Stack, wanted: frozenset[str], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Every alert seen pending or firing until all of ``wanted`` have been, by name."""
    seen: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for alert in stack.alerts():
            assert alert["state"] in ("pending", "firing"), alert
            seen.setdefault(alert["labels"]["alertname"], []).append(alert)
        if wanted <= seen.keys():
            return seen
        if time.monotonic() > deadline:
            pytest.fail(
                f"alerts {sorted(wanted - seen.keys())} never became pending or firing within "
                f"{timeout:.0f} s; seen: {sorted(seen)}{stack.diagnostics()}"
            )
        time.sleep(1.0)


def assert_rules_evaluate_cleanly(stack: Stack) -> None:
    groups = stack.api("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for f in shortened_rules() for g in f["groups"])
    broken = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert broken == [], f"rules failing to evaluate: {broken}"


def substituted_dashboard_queries(netns: str) -> list[tuple[str, str, bool]]:
    """(where, PromQL, expect data) for every panel query, variables set to this stack's."""
    values = {"instance": TCPWATCH_ADDRESS, "netns": netns, "peer": ".+", **GRAFANA_INTERVALS}
    return [
        (
            str(query),
            substitute(query.expr, values),
            # Limits that exist only in the host's namespace are absent here (docs/metrics.md),
            # and so is a product of such a limit with the page size (a per-host scale).
            not all(
                selects_host_only_sysctls(s) or s.metric in PER_HOST_SCALES
                for s in selectors(query.expr)
            ),
        )
        for query in panel_queries(load_dashboard())
    ]


# -- the tests ---------------------------------------------------------------------------------


def test_unhealthy_population_fires_alerts_and_fills_every_dashboard_panel(netns: Netns) -> None:
    netns.sysctl("net.ipv4.ip_local_port_range", f"{PORT_RANGE[0]} {PORT_RANGE[1]}")
    with running_stack(netns) as stack:
        # Built after Prometheus has samples, so counters and CLOSE_WAIT are seen moving.
        accept_queue = populations.accept_queue_full(netns, port=ACCEPT_QUEUE_PORT, backlog=4)
        populations.close_wait(netns, count=60, port=CLOSE_WAIT_PORTS[0], process_name=LEAKER)
        populations.established(netns, pairs=POOL_PAIRS, port=POOL_PORT)
        start_syn_flood(netns, SYN_COOKIE_PORT)
        # A listener's owner at its RLIMIT_NOFILE: Q05 critical, which has no alert of its own.
        fd_limited = populations.fd_limited_listener(netns, port=FD_LIMITED_PORT)
        # On 127.4.0.1, not 127.0.0.1: the per-destination fleet rules leave each node's own
        # 127.0.0.1 out, and every recording rule must have data here.
        churn = start_churn(netns, CHURN_PORT, LIFETIME, lossy=True, host="127.4.0.1")
        wait_for(
            "Prometheus sees the first CLOSE_WAIT batch",
            lambda: bool(stack.query(f'tcpwatch_process_sockets{{process="{LEAKER}"}} >= 60')),
            30,
            stack,
        )
        populations.close_wait(netns, count=30, port=CLOSE_WAIT_PORTS[1], process_name=LEAKER)
        netns.sysctl("net.ipv4.tcp_syncookies", "0")
        start_syn_flood(netns, SYN_DROP_PORT)

        seen = collect_alerts(stack, UNHEALTHY_ALERTS, ALERT_TIMEOUT)
        runbooks: set[str] = set()
        wrongly_raised = SELF_ALERTS & seen.keys()
        assert not wrongly_raised, {name: seen[name] for name in wrongly_raised}
        for alerts in seen.values():
            for alert in alerts:
                assert alert["labels"].get("netns", netns.name) == netns.name, alert
                assert alert["labels"]["instance"] == TCPWATCH_ADDRESS, alert
                # No published docs here: runbooks are the reporting tcpwatch's own pages.
                runbook = alert["annotations"]["runbook_url"]
                assert runbook.startswith(f"http://{TCPWATCH_ADDRESS}/"), alert
                runbooks.add(runbook)

        def labelled(name: str, **labels: str) -> list[dict[str, Any]]:
            return [
                alert
                for alert in seen[name]
                if all(alert["labels"].get(key) == value for key, value in labels.items())
            ]

        saturated = labelled(
            "TcpwatchAcceptQueueSaturated", address="127.0.0.1", port=str(ACCEPT_QUEUE_PORT)
        )
        assert saturated, seen["TcpwatchAcceptQueueSaturated"]
        # The description names the listener's owner through tcpwatch_listener_info.
        assert f"[{accept_queue.info['pid']}]" in saturated[0]["annotations"]["description"]
        leaking = labelled("TcpwatchCloseWaitGrowing", process=LEAKER)
        assert leaking, seen["TcpwatchCloseWaitGrowing"]
        pool = f"127.0.0.1:{POOL_PORT}"
        exhausted = {
            alert["labels"]["severity"]
            for alert in labelled("TcpwatchEphemeralPortsNearlyExhausted", destination=pool)
        }
        assert exhausted == {"warning", "critical"}, seen["TcpwatchEphemeralPortsNearlyExhausted"]
        pressured = {alert["labels"]["port"] for alert in seen["TcpwatchSynQueuePressure"]}
        assert {str(SYN_COOKIE_PORT), str(SYN_DROP_PORT)} <= pressured
        # One page per problem: the full accept queue pages through TcpwatchAcceptQueueSaturated
        # only; the generic alert carries the critical findings no other alert covers.
        paged_twice = {"Q01", "Q04", "K01", "P01"} & {
            alert["labels"]["id"] for alert in seen["TcpwatchCriticalFinding"]
        }
        assert not paged_twice, seen["TcpwatchCriticalFinding"]
        owner = Path(f"/proc/{fd_limited.info['pid']}/comm").read_text().strip()
        critical = labelled("TcpwatchCriticalFinding", id="Q05", subject=owner)
        assert critical, seen["TcpwatchCriticalFinding"]
        assert critical[0]["annotations"]["runbook_url"].endswith("/rules/Q05")
        # Every runbook link the alerts carry answers (issue 22 item 1: nothing points nowhere).
        fetch = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)"
        for runbook in sorted(runbooks):
            assert netns.run(sys.executable, "-c", fetch, runbook, check=False).returncode == 0, (
                runbook
            )
        # The owner's descriptors as psutil saw them, next to the limit it set itself.
        described = {  # by process name: the series outlives a restart
            name: stack.query(f'tcpwatch_process_{name}{{process="{owner}"}}')
            for name in ("open_fds", "max_fds")
        }
        assert [float(r["value"][1]) for r in described["max_fds"]] == [
            fd_limited.info["soft_limit"]
        ], described
        assert [float(r["value"][1]) for r in described["open_fds"]] == [
            fd_limited.info["open_fds"]
        ], described
        failing = {alert["labels"]["peer"] for alert in seen["TcpwatchConnectFailures"]}
        assert {churn.peer(churn.refused_port), churn.peer(churn.timeout_port)} <= failing
        assert churn.peer(churn.ok_port) not in failing
        assert churn.lossy_port is not None
        lossy = labelled("TcpwatchRetransmissionRatioHigh", peer=churn.peer(churn.lossy_port))
        assert lossy, seen["TcpwatchRetransmissionRatioHigh"]
        # Each churn peer's closed connections are under the outcome it was built for.
        for port, outcome in (
            (churn.ok_port, "ok"),
            (churn.refused_port, "refused"),
            (churn.timeout_port, "timeout"),
        ):
            closed = stack.query(
                f'tcpwatch_connections_closed_total{{direction="outbound",'
                f'peer="{churn.peer(port)}",outcome="{outcome}"}} > 0'
            )
            assert closed, f"no {outcome} connections to {churn.peer(port)}"

        assert_rules_evaluate_cleanly(stack)
        # Every fleet view has data.
        recording = shortened_rules()[1]
        records = [rule["record"] for group in recording["groups"] for rule in group["rules"]]
        answers = stack.fetch([api_url("/api/v1/query", query=record) for record in records])
        recorded = {r: api_data(a, r)["result"] for r, a in zip(records, answers, strict=True)}
        assert [record for record, result in recorded.items() if not result] == []

        # Every dashboard query, as Grafana would send it, returns data (instant queries).
        queries = substituted_dashboard_queries(netns.name)
        answers = stack.fetch([api_url("/api/v1/query", query=q) for _, q, _ in queries])
        empty = []
        for (where, expr, expect_data), answer in zip(queries, answers, strict=True):
            result = api_data(answer, f"{where}: {expr}")["result"]
            if expect_data and not result:
                empty.append(f"{where}: {expr}")
            if not expect_data:
                assert result == [], f"{where}: host-only limit present outside the host: {result}"
        assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
        assert sum(expect for _, _, expect in queries) >= len(queries) - 3

        # The template variables' label_values() queries offer this instance and namespace.
        for name, wanted in (("instance", TCPWATCH_ADDRESS), ("netns", netns.name)):
            query = template_variables(load_dashboard())[name]["query"]["query"]
            selector = substitute(
                query.removeprefix("label_values(").rsplit(",", 1)[0],
                {"instance": TCPWATCH_ADDRESS, "netns": netns.name},
            )
            values = stack.api(f"/api/v1/label/{name}/values", **{"match[]": selector})
            assert wanted in values, f"variable {name}: {values}"

        # The live exposition passes promtool's linter.
        [metrics] = stack.fetch([f"http://{TCPWATCH_ADDRESS}/metrics"])
        assert metrics.status == 200 and "tcpwatch_finding{" in metrics.body, metrics.body[:500]
        lint = subprocess.run(
            ["promtool", "check", "metrics"],
            input=metrics.body,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

        # Without tcpwatch, its down alert comes up.
        netns.stop(stack.tcpwatch)
        collect_alerts(stack, frozenset({"TcpwatchDown"}), 30)


def test_healthy_population_fires_no_alert(netns: Netns) -> None:
    with running_stack(netns) as stack:
        # From here tcpwatch has been scraped: TcpwatchAbsent's 15 minutes (1 s in the test copy)
        # cover the seconds before the first scrape in real use.
        watched_since = time.monotonic()
        populations.established(netns, pairs=40, port=20001)
        populations.time_wait(netns, count=25, port=20003)
        built = time.time()
        # Long enough for any rule to have seen the population over several evaluations.
        wait_for(
            "ten scrapes after the population was built",
            lambda: bool(
                stack.query(
                    "count_over_time(tcpwatch_last_poll_timestamp_seconds[1m]) >= 10 "
                    f"and tcpwatch_last_poll_timestamp_seconds > {built + 8:.3f}"
                )
            ),
            START_TIMEOUT,
            stack,
        )
        assert_rules_evaluate_cleanly(stack)
        for _ in range(5):
            assert stack.alerts() == [], stack.alerts()
            time.sleep(1.0)
        # ALERTS holds a sample for every evaluation in which an alert was pending or firing.
        watched = int(time.monotonic() - watched_since)
        history = stack.query(f"count_over_time(ALERTS[{watched}s])")
        findings = stack.query("tcpwatch_finding == 1")
        assert history == [], f"alerts during the run: {history}; findings: {findings}"
        # The population was really seen: the silence is not for lack of data.
        established = stack.query('sum(tcpwatch_sockets{state="established"}) >= 80')
        assert established, stack.query('tcpwatch_sockets{state="established"}')
