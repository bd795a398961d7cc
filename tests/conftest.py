"""Suite-wide policy: under CI a skipped test is a failure.

CI runs the suite with the environment variable ``CI`` set (``.ci/run`` sets ``CI=true``). There a
skip would hide a missing tool or privilege, so every skip, whether raised by a test, a fixture,
a ``skip``/``skipif`` marker or at collection (``pytest.importorskip``), is reported as a
failure carrying the skip's reason. Expected failures (``xfail``) are left alone. ``CI`` set to
``""``, ``0``, ``false`` or ``no`` counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

_OFF = frozenset({"", "0", "false", "no"})


def running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in _OFF


def _skip_reason(longrepr: object) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason"); anything else is shown as it is.
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, message = longrepr
        return f"{message} ({path}:{line})"
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if running_under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI, which counts as a failure: {_skip_reason(report.longrepr)}"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if running_under_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            f"{collector.nodeid} skipped at collection under CI, which counts as a failure: "
            f"{_skip_reason(report.longrepr)}"
        )
    return report
