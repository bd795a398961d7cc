"""The corpus needs root, the namespace tools and the real programs: missing ones fail every test
by name (never a skip; scripts/test installs them)."""

from __future__ import annotations

import pytest

from tests.incidents.programs import missing_programs
from tests.integration.netns import missing_prerequisites


@pytest.fixture(scope="session", autouse=True)
def incident_prerequisites() -> None:
    problems = missing_prerequisites()
    missing = missing_programs()
    if missing:
        problems.append("programs missing (scripts/test installs them): " + ", ".join(missing))
    if problems:
        pytest.fail("incident tests cannot run: " + "; ".join(problems), pytrace=False)
