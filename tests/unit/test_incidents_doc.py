"""docs/incidents.md is generated from the incident corpus and kept in step with it: every incident
names a test that exists, has its transcript recorded by that test, and the file on disk is what
the generator writes (``python -m tests.incidents.document``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.incidents import document
from tests.incidents.catalogue import INCIDENTS

CORPUS = Path(document.__file__).resolve().parent


def _tests_in(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }


def test_every_incident_names_a_test_that_exists() -> None:
    for incident in INCIDENTS:
        module, _, name = incident.test.partition("::")
        function = re.sub(r"\[.*\]$", "", name)
        assert function in _tests_in(CORPUS / module), incident.test


def test_every_incident_has_its_recorded_transcript() -> None:
    for incident in INCIDENTS:
        transcript = document.TRANSCRIPTS / f"{incident.key}.txt"
        assert transcript.exists(), f"record it: TCPWATCH_RECORD_INCIDENTS=1 ({incident.test})"
        text = transcript.read_text()
        assert text.startswith("TCPWATCH "), f"{transcript}: not what `tcpwatch check` prints"
        assert "tw-" not in text, f"{transcript}: the namespace's random name was left in"


def test_incident_keys_are_unique() -> None:
    keys = [incident.key for incident in INCIDENTS]
    assert len(keys) == len(set(keys))


def test_docs_incidents_md_is_generated() -> None:
    assert document.DOC.read_text() == document.render(), (
        "docs/incidents.md is out of date: python -m tests.incidents.document"
    )
