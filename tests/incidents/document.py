"""Generate docs/incidents.md from the corpus: ``python -m tests.incidents.document [--check]``.

The prose comes from :mod:`tests.incidents.catalogue`, the output of `tcpwatch check` from the
transcripts the incident tests record (``TCPWATCH_RECORD_INCIDENTS=1``). ``--check`` exits 1 when
the file on disk differs from what would be generated.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.incidents.catalogue import INCIDENTS, Incident

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "incidents.md"
TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"

_HEAD = """# Incidents: what tcpwatch said

Each incident below was staged with real programs from Debian's packages (nginx, haproxy,
PostgreSQL, redis, wrk, curl, hping3) inside a throw-away network namespace on Linux, and judged
by `tcpwatch check --window 5` while it happened. The output is what tcpwatch printed, recorded
by the test named under each incident (`tests/incidents/`), not written by hand; the tests also
check the same findings through `tcpwatch serve` (`check --from`). Namespaces are shown by their
label (`web`, `proxy`, ...); process ids are those of the run.

Regenerate with `TCPWATCH_RECORD_INCIDENTS=1 scripts/test tests/incidents` (as root).

"""


def _section(incident: Incident) -> str:
    transcript = TRANSCRIPTS / f"{incident.key}.txt"
    output = (
        transcript.read_text().rstrip("\n")
        if transcript.exists()
        else "(not recorded yet: run the test with TCPWATCH_RECORD_INCIDENTS=1)"
    )
    parts = [
        f"## {incident.title}",
        f'<a id="{incident.key}"></a>Test: `tests/incidents/{incident.test}`',
        f"**Setup.** {incident.setup}",
        f"**What happened.** {incident.happened}",
        "**What `tcpwatch check --window 5` printed:**",
        f"```\n{output}\n```",
        f"**What to do.** {incident.todo}",
    ]
    if incident.limits:
        parts.append(f"**What TCP shows, and what it does not.** {incident.limits}")
    return "\n\n".join(parts) + "\n"


def render() -> str:
    index = "\n".join(f"- [{i.title}](#{i.key})" for i in INCIDENTS)
    return _HEAD + index + "\n\n" + "\n".join(_section(i) for i in INCIDENTS)


def write() -> None:
    DOC.write_text(render())


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        if not DOC.exists() or DOC.read_text() != render():
            print(f"{DOC} is out of date: python -m tests.incidents.document", file=sys.stderr)
            return 1
        return 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
