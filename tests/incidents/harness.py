"""One incident, watched the two ways a user watches a host: `tcpwatch check` and `tcpwatch serve`.

A :class:`Scene` is a throw-away namespace named after the incident (plus a temp directory for
the programs' files). The test stages the incident in it (real servers, a real load tool), then:

* ``scene.serve()`` starts ``tcpwatch serve`` there early (1 s polls, ``rules.window`` of
  :data:`WINDOW` seconds) so that by the time it is asked it judges a full window;
* ``scene.check()`` runs ``tcpwatch check --window WINDOW`` twice at once, once for the text a
  person reads (recorded for docs/incidents.md) and once as JSON for the assertions;
* ``scene.check_from()`` asks the daemon (``check --from``) for its findings.

Verdict helpers assert what matters to a person who was paged: the finding names the right
subject, process and cause, and no finding points anywhere else (:meth:`Verdict.only`).

With ``TCPWATCH_RECORD_INCIDENTS=1`` each test writes what `check` printed to
``tests/incidents/transcripts/<key>.txt`` and regenerates docs/incidents.md
(``python -m tests.incidents.document`` does the latter alone).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.netns import REPO_ROOT, Netns, tcpwatch_env
from tests.integration.test_serve import Served, start_serve

WINDOW = 5.0  # seconds: check's --window and serve's rules.window
SERVE_PORT = 9477  # tcpwatch's own default, below every ephemeral range a finding proposes
CHECK_TIMEOUT = 90.0
TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"


def recording() -> bool:
    return os.environ.get("TCPWATCH_RECORD_INCIDENTS", "") not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Verdict:
    """What one `check` (direct or --from) said: exit code, JSON report, and the text if any."""

    source: str  # "check" or "check --from"
    exit_code: int
    report: Mapping[str, Any]
    text: str = ""

    @property
    def findings(self) -> list[dict[str, Any]]:
        findings: list[dict[str, Any]] = self.report["findings"]
        return findings

    def keys(self) -> set[tuple[str, str]]:
        return {(f["id"], f["subject"]) for f in self.findings}

    def describe(self) -> str:
        lines = [f"{self.source}: exit {self.exit_code}"]
        for f in self.findings:
            lines.append(f"  {f['id']} {f['severity']} {f['subject']!r}: {f['title']}")
            lines.extend(f"      {k}: {v}" for k, v in f["evidence"].items())
            lines.extend(f"      | {line}" for line in f["remediation"].splitlines())
        return "\n".join(lines)

    def one(self, rule_id: str, subject: str) -> dict[str, Any]:
        matches = [f for f in self.findings if (f["id"], f["subject"]) == (rule_id, subject)]
        assert len(matches) == 1, f"expected one {rule_id} about {subject!r}\n{self.describe()}"
        return matches[0]

    def only(self, expected: Iterable[tuple[str, str]], tolerated: Iterable[tuple[str, str]] = ()
             ) -> None:  # fmt: skip
        """Every expected (id, subject) is found, and nothing but those and the tolerated ones:
        a finding about anything else points the reader the wrong way."""
        wanted, allowed = set(expected), set(expected) | set(tolerated)
        found = self.keys()
        assert wanted <= found, f"missing {sorted(wanted - found)}\n{self.describe()}"
        assert found <= allowed, f"unexpected {sorted(found - allowed)}\n{self.describe()}"

    def none_says(self, *phrases: str) -> None:
        """No title or remediation contains any of ``phrases`` (case-insensitive)."""
        for f in self.findings:
            text = (f["title"] + "\n" + f["remediation"]).lower()
            for phrase in phrases:
                assert phrase.lower() not in text, (
                    f"{f['id']} {f['subject']!r} says {phrase!r}\n{self.describe()}"
                )


@dataclass
class Scene:
    key: str  # the incident's key in catalogue.INCIDENTS
    ns: Netns
    directory: Path
    served: Served | None = None
    staged_at: float | None = None  # monotonic time the last wait_for() saw its condition

    # -- tcpwatch ------------------------------------------------------------------------------

    def serve(self, *extra_config: str) -> Served:
        """`tcpwatch serve` in the namespace, 1 s polls, judging a window of WINDOW seconds."""
        config = self.directory / "tcpwatch.yaml"
        config.write_text("\n".join(["rules:", f"  window: {WINDOW:g}s", *extra_config]) + "\n")
        args = ["--listen", f"127.0.0.1:{SERVE_PORT}", "--interval", "1", "--config", str(config)]
        served = start_serve(self.ns, self.directory / "serve.log", *args)
        served.port = SERVE_PORT
        served.wait_ready()
        self.served = served
        return served

    def _argv(self, *args: str) -> list[str]:
        return self.ns.exec_argv(sys.executable, "-m", "tcpwatch", *args)

    def check(self, window: float = WINDOW, *args: str) -> tuple[Verdict, str]:
        """`tcpwatch check --window W` as JSON and as text, run side by side over one window.

        Returns the JSON verdict and the text; the text is recorded as the transcript.
        """
        common = ["check", "--window", f"{window:g}", *args]

        def start(*more: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                self._argv(*common, *more),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=tcpwatch_env(),
                cwd=str(REPO_ROOT),
            )

        with start("--format", "json") as as_json, start() as as_text:
            json_out, json_err = as_json.communicate(timeout=CHECK_TIMEOUT)
            text_out, text_err = as_text.communicate(timeout=CHECK_TIMEOUT)
        for out, err, code in ((json_out, json_err, as_json.returncode),
                               (text_out, text_err, as_text.returncode)):  # fmt: skip
            assert "Traceback" not in out + err, f"{out}\n{err}"
            assert code in (0, 1, 2), f"exit {code}: {out}\n{err}"
        verdict = Verdict("check", as_json.returncode, json.loads(json_out))
        assert verdict.report["exit_code"] == as_json.returncode
        self.record(text_out)
        return verdict, text_out

    def check_from(self) -> Verdict:
        """The daemon's findings, through `tcpwatch check --from` (JSON)."""
        assert self.served is not None, "serve() first"
        self._wait_for_a_full_window()
        url = f"http://127.0.0.1:{self.served.port}"
        done = subprocess.run(self._argv("check", "--from", url, "--format", "json"),
                              capture_output=True, text=True, timeout=CHECK_TIMEOUT,
                              env=tcpwatch_env(), cwd=str(REPO_ROOT), check=False)  # fmt: skip
        assert "Traceback" not in done.stdout + done.stderr, done.stderr
        assert done.returncode in (0, 1, 2), f"exit {done.returncode}: {done.stderr}"
        return Verdict("check --from", done.returncode, json.loads(done.stdout))

    def _wait_for_a_full_window(self) -> None:
        """The daemon judges the incident once a window has passed since it was staged.

        A finding that needs the cause to last through the window (S01) is only due from a
        poll whose window starts after the staging ended: wait out the rest of WINDOW, then
        for a poll that started after that (two completed, the second began after the first).
        """
        assert self.served is not None
        if self.staged_at is not None:
            time.sleep(max(0.0, min(WINDOW, self.staged_at + WINDOW - time.monotonic())))
        self.served.wait_for_polls(self.served.polls() + 1, timeout=CHECK_TIMEOUT)

    def record(self, text: str) -> None:
        if recording():
            TRANSCRIPTS.mkdir(exist_ok=True)
            (TRANSCRIPTS / f"{self.key}.txt").write_text(normalise(text, self.ns.name, self.label))
            from tests.incidents import document

            document.write()

    @property
    def label(self) -> str:
        return self.ns.name.rsplit("-", 1)[0]

    # -- the kernel's own view -----------------------------------------------------------------

    def listener_drops(self, port: int) -> int:
        """sk_drops of the listener on ``port`` as `ss -ltnm` prints it (d<N>)."""
        text = self.ns.ss("-ltnHm", f"sport = :{port}")
        found = re.findall(r"\bd(\d+)\)", text)
        assert len(found) == 1, text
        return int(found[0])

    def wait_for(
        self,
        what: str,
        condition: Any,
        timeout: float = 20.0,
        process: subprocess.Popen[str] | None = None,
    ) -> None:
        """Poll ``condition`` until true; fails after ``timeout`` with ``process``'s stderr."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                told = f"; stderr: {self.ns.stderr_of(process)[-1500:]}" if process else ""
                raise AssertionError(f"{what} did not happen within {timeout} s{told}")
            time.sleep(0.1)
        self.staged_at = time.monotonic()

    def sockets(self, state: str, port: int) -> int:
        """Sockets in ``state`` (ss's name: syn-recv, close-wait ...) with ``port`` at either end.

        (With a state filter ss leaves the state column out, so lines are counted.)
        """
        text = self.ns.ss("-tanH", "state", state, f"( sport = :{port} or dport = :{port} )")
        return sum(1 for line in text.splitlines() if line.strip())


def normalise(text: str, netns: str, label: str) -> str:
    """A transcript as docs show it: the namespace's random suffix gone, no trailing spaces."""
    lines = (line.rstrip() for line in text.replace(netns, label).splitlines())
    return "\n".join(lines).strip("\n") + "\n"


@contextmanager
def scene(key: str, label: str) -> Iterator[Scene]:
    """A namespace ``<label>-<random>`` and a temp directory the programs may write to."""
    with tempfile.TemporaryDirectory(prefix=f"tw-incident-{key}-") as directory, \
         Netns(prefix=label) as ns:  # fmt: skip
        setting = Scene(key, ns, Path(directory))
        try:
            yield setting
        finally:
            if setting.served is not None and setting.served.process.poll() is None:
                setting.served.process.kill()
                setting.served.process.wait(timeout=10)
