"""`tcpwatch check` as a check of a real monitoring core: Debian's Icinga 2 runs it with its own
plugin execution, and what Icinga parsed is read back from its REST API (issue 16 item 4).

One network namespace holds a full accept queue (Q01, critical), a `tcpwatch serve` watching it,
and an Icinga 2 daemon (API on loopback there, its own TLS certificate, state under a temporary
directory). A CheckCommand written as an admin would (command, arguments with macros) runs the
checkout's tcpwatch for each service in CASES; the test waits for each service's check result and
checks the state, the plugin output (first line, long output) and the performance data, which
Icinga's own `parse_performance_data()` must accept with the intended values and units.

To extend: add a Case (vars become `<flag> $macro$` through ARGUMENTS). Every UNKNOWN path prints
its status line on stdout (UNKNOWN_FIRST_LINE), which Icinga shows as the plugin output.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import populations
from .netns import REPO_ROOT, Netns

pytestmark = pytest.mark.integration

API_PORT = 15665
SERVE_PORT = 19477
DOWN_PORT = 19478  # nothing listens there
API_USER, API_PASSWORD = "tw-test", "tw-test-secret"
NODE = "tw-icinga"
CHECK_SECONDS = 90.0
# The macros a service may set, and the tcpwatch flag each becomes (Icinga leaves an argument
# out when its macro is unset): the plugin flags a monitoring core's admin sets per service.
ARGUMENTS: Mapping[str, str] = {
    "--window": "tcpwatch_window",
    "--from": "tcpwatch_from",
    "--netns": "tcpwatch_netns",
    "-t": "tcpwatch_timeout",
    "-w": "tcpwatch_warning",
    "-c": "tcpwatch_critical",
}
UNKNOWN_FIRST_LINE = "TCPWATCH UNKNOWN - "
PERF_LABELS = [
    "critical", "warning", "info", "accept_queue_fill", "close_wait", "time_wait", "orphans",
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    service: str
    vars: Mapping[str, str]
    state: int  # Icinga's service state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN
    first_line: str  # a regex the first output line must match
    long_output: tuple[str, ...] = ()  # texts the lines after the first must contain
    perfdata: bool = True
    fill_levels: tuple[int, int] = (80, 100)  # accept_queue_fill's warn and crit in the perfdata


def cases(clean_netns: str) -> list[Case]:
    return [
        Case(
            "direct",
            {"tcpwatch_window": "0"},
            2,
            r"TCPWATCH CRITICAL - 1 critical\b.*",
            ("[Q01 accept-queue-full]", "fix ", "doc         tcpwatch rules Q01"),
        ),
        Case(
            "from-daemon",
            {"tcpwatch_from": f"http://127.0.0.1:{SERVE_PORT}"},
            2,
            r"TCPWATCH CRITICAL - 1 critical\b.*",
            ("[Q01 accept-queue-full]",),
        ),
        Case(
            "clean-namespace",
            {"tcpwatch_window": "0", "tcpwatch_netns": clean_netns},
            0,
            r"TCPWATCH OK - no findings",
        ),
        Case(
            "from-daemon-down",
            {"tcpwatch_from": f"http://127.0.0.1:{DOWN_PORT}"},
            3,
            rf"{UNKNOWN_FIRST_LINE}.*cannot reach tcpwatch at http://127\.0\.0\.1:{DOWN_PORT}\b.*",
            perfdata=False,
        ),
        # The admin set Q01's levels from the command line: the perfdata carries them.
        Case(
            "levels-set",
            {"tcpwatch_window": "0", "tcpwatch_warning": "Q01=50%", "tcpwatch_critical": "Q01=90%"},
            2,
            r"TCPWATCH CRITICAL - 1 critical\b.*",
            ("[Q01 accept-queue-full]",),
            fill_levels=(50, 90),
        ),
        # A window longer than the whole-check timeout: UNKNOWN, saying so, on stdout.
        Case(
            "timeout",
            {"tcpwatch_window": "1", "tcpwatch_timeout": "1"},
            3,
            rf"{UNKNOWN_FIRST_LINE}.*-t/--timeout.*",
            perfdata=False,
        ),
    ]


def icinga_config(case_list: list[Case]) -> str:
    arguments = "\n".join(f'    "{flag}" = "${macro}$"' for flag, macro in ARGUMENTS.items())
    services = "\n".join(
        f'object Service "{case.service}" {{\n'
        '  host_name = "tw"\n  check_command = "tcpwatch"\n'
        "  check_interval = 2s\n  retry_interval = 2s\n  max_check_attempts = 1\n"
        + "".join(f'  vars.{key} = "{value}"\n' for key, value in case.vars.items())
        + "}"
        for case in case_list
    )
    return f"""
object CheckerComponent "checker" {{ }}
object ApiListener "api" {{ bind_host = "127.0.0.1"; bind_port = {API_PORT} }}
object ApiUser "{API_USER}" {{ password = "{API_PASSWORD}"; permissions = [ "*" ] }}
object Endpoint NodeName {{ }}
object Zone ZoneName {{ endpoints = [ NodeName ] }}
object CheckCommand "alive" {{ command = [ "/bin/true" ] }}
object Host "tw" {{ check_command = "alive"; address = "127.0.0.1" }}
object CheckCommand "tcpwatch" {{
  command = [ "{sys.executable}", "-m", "tcpwatch", "check" ]
  arguments = {{
{arguments}
  }}
  env = {{ PYTHONPATH = "{REPO_ROOT}" }}
  timeout = 60s
}}
{services}
"""


@dataclass(frozen=True)
class Icinga:
    ns: Netns
    directory: Path

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One API request from inside the namespace (the API listens on its loopback)."""
        script = (
            "import base64, json, ssl, sys, urllib.request\n"
            "context = ssl.create_default_context(cafile=sys.argv[1])\n"
            "context.check_hostname = False\n"
            "request = urllib.request.Request(sys.argv[2], method=sys.argv[3],\n"
            "    data=sys.argv[4].encode() or None, headers={'Accept': 'application/json',\n"
            "    'Authorization': 'Basic ' + base64.b64encode(sys.argv[5].encode()).decode()})\n"
            "print(urllib.request.urlopen(request, context=context, timeout=20).read().decode())\n"
        )
        result = self.ns.run(
            sys.executable, "-c", script, str(self.directory / "DataDir/certs/ca.crt"),
            f"https://127.0.0.1:{API_PORT}{path}", method, json.dumps(body) if body else "",
            f"{API_USER}:{API_PASSWORD}", check=False, timeout=40,
        )  # fmt: skip
        assert result.returncode == 0, f"Icinga API {method} {path}: {result.stderr[-2000:]}"
        return json.loads(result.stdout)

    def log(self) -> str:
        path = self.directory / "icinga2.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_icinga(ns: Netns, directory: Path, config: str) -> Icinga:
    for name in ("DataDir/certs", "LogDir", "CacheDir", "SpoolDir", "InitRunDir"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    certs = directory / "DataDir" / "certs"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={NODE}", "-keyout", str(certs / f"{NODE}.key"),
         "-out", str(certs / f"{NODE}.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    shutil.copy(certs / f"{NODE}.crt", certs / "ca.crt")  # self-signed: its own CA
    (directory / "icinga2.conf").write_text(config)
    places = ("DataDir", "LogDir", "CacheDir", "SpoolDir", "InitRunDir")
    defines = [f"-D{key}={directory / key}" for key in places]
    defines += [f"-DNodeName={NODE}", f"-DZoneName={NODE}", "-DRunAsUser=root", "-DRunAsGroup=root"]
    command = " ".join(
        ["exec", "icinga2", "daemon", "-c", str(directory / "icinga2.conf"), *defines,
         ">", str(directory / "icinga2.log"), "2>&1"]
    )  # fmt: skip
    ns.spawn(["sh", "-c", command], lifetime=600)
    icinga = Icinga(ns, directory)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "'api' started" in icinga.log() and "Activated all objects" in icinga.log():
            return icinga
        time.sleep(0.5)
    raise AssertionError(f"Icinga 2 did not start:\n{icinga.log()[-4000:]}")


def start_serve(ns: Netns) -> None:
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    ns.spawn(
        [sys.executable, "-m", "tcpwatch", "serve", "--web.listen-address",
         f"127.0.0.1:{SERVE_PORT}", "--interval", "1"],
        env=env, cwd=str(REPO_ROOT), lifetime=600,
    )  # fmt: skip
    probe = (
        "import sys, urllib.request\n"
        f"urllib.request.urlopen('http://127.0.0.1:{SERVE_PORT}/-/ready', timeout=5)\n"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ns.run(sys.executable, "-c", probe, check=False, timeout=20).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("tcpwatch serve did not become ready")


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Icinga, list[Case]]]:
    assert shutil.which("icinga2"), "icinga2 is not installed (scripts/test installs it)"
    directory = tmp_path_factory.mktemp("icinga")
    directory.chmod(0o755)
    with Netns() as ns, Netns() as clean:
        populations.standard(ns, "accept_queue_full")
        start_serve(ns)
        case_list = cases(clean.name)
        icinga = start_icinga(ns, directory, icinga_config(case_list))
        started = time.time()
        deadline = time.monotonic() + CHECK_SECONDS
        pending = {case.service for case in case_list}
        while pending and time.monotonic() < deadline:
            results = icinga.api("GET", "/v1/objects/services?attrs=last_check_result")
            for item in results["results"]:
                result = item["attrs"]["last_check_result"]
                if result and result["execution_start"] >= started:
                    pending.discard(item["name"].split("!", 1)[1])
            time.sleep(1)
        assert not pending, f"no check result for {pending}:\n{icinga.log()[-4000:]}"
        yield icinga, case_list


def service(icinga: Icinga, name: str) -> dict[str, Any]:
    found = icinga.api("GET", f"/v1/objects/services/tw!{name}?attrs=last_check_result&attrs=state")
    (item,) = found["results"]
    attrs: dict[str, Any] = item["attrs"]
    return attrs


def parsed_perfdata(icinga: Icinga, name: str) -> list[dict[str, Any]]:
    """The service's performance data as Icinga's own parser reads each value."""
    script = (
        f'var pd = get_service("tw", "{name}").last_check_result.performance_data; '
        "var out = []; for (p in pd) { out.add(parse_performance_data(p)) }; out"
    )
    answer = icinga.api("POST", "/v1/console/execute-script", {"command": script})
    (result,) = answer["results"]
    assert result["code"] == 200, result
    parsed: list[dict[str, Any]] = result["result"]
    return parsed


@pytest.mark.parametrize(
    "index", range(6), ids=["direct", "from-daemon", "clean", "down", "levels", "timeout"]
)
def test_icinga_reads_state_output_and_perfdata(
    checked: tuple[Icinga, list[Case]], index: int
) -> None:
    icinga, case_list = checked
    case = case_list[index]
    attrs = service(icinga, case.service)
    result = attrs["last_check_result"]
    assert (attrs["state"], result["exit_status"]) == (case.state, case.state), result
    # Icinga ran the CheckCommand with the arguments the service's vars gave.
    command = result["command"]
    assert command[:4] == [sys.executable, "-m", "tcpwatch", "check"]
    for flag, macro in ARGUMENTS.items():
        if macro in case.vars:
            assert command[command.index(flag) + 1] == case.vars[macro]
        else:
            assert flag not in command
    output: str = result["output"]
    lines = output.splitlines()
    # Icinga keeps the space tcpwatch writes before "|" (plugin guidelines allow it).
    assert re.fullmatch(case.first_line, lines[0].rstrip()), output[:2000]
    assert "|" not in output, "performance data left in the output: Icinga did not split it"
    for text in case.long_output:
        assert any(text in line for line in lines[1:]), (text, output[:3000])
    if not case.perfdata:
        assert result["performance_data"] == []
        return
    parsed = parsed_perfdata(icinga, case.service)
    assert [p["label"] for p in parsed] == PERF_LABELS
    by_label = {p["label"]: p for p in parsed}
    expected_criticals = 1 if case.state == 2 else 0
    assert by_label["critical"]["value"] == expected_criticals
    assert by_label["critical"]["min"] == 0
    fill = by_label["accept_queue_fill"]
    assert (fill["unit"], fill["warn"], fill["crit"], fill["min"], fill["max"]) == (
        "percent", *case.fill_levels, 0, 100,  # Icinga names the unit
    )  # fmt: skip
    assert fill["value"] >= (100 if case.state == 2 else 0)
    for label in ("close_wait", "time_wait", "orphans"):
        assert by_label[label]["value"] >= 0 and by_label[label]["unit"] == ""
    assert "perfdata" not in icinga.log().lower(), "Icinga complained about performance data"
