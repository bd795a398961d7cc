"""Fixtures for integration tests: prerequisites that fail loudly, and throw-away namespaces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .netns import Netns, missing_prerequisites


@pytest.fixture(scope="session", autouse=True)
def integration_prerequisites() -> None:
    """Root and the tools the harness drives; missing ones fail every integration test, by name.

    Never a skip: a CI machine without them must go red, not quietly pass.
    """
    problems = missing_prerequisites()
    if problems:
        pytest.fail("integration tests cannot run: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def netns(integration_prerequisites: None) -> Iterator[Netns]:
    """A fresh namespace (lo up) for one test; everything in it is killed and removed afterwards."""
    with Netns() as ns:
        yield ns
