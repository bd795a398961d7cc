"""Where `tcpwatch top` gets its numbers: a running daemon's JSON API, or this host polled by a
Pipeline of its own (the same documents either way, so the screen has one code path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tcpwatch.client import Daemon, DaemonError, parse_daemon_url
from tcpwatch.config import Config
from tcpwatch.endpoints import local_daemon_url
from tcpwatch.jsonshape import ShapeError
from tcpwatch.paths import ProcPaths
from tcpwatch.pipeline import Pipeline
from tcpwatch.render import api
from tcpwatch.top.documents import checked_findings, checked_snapshot
from tcpwatch.top.local import verify

Documents = tuple[dict[str, Any], dict[str, Any]]  # /api/v1/snapshot, /api/v1/findings
LIMIT = 100  # listeners and destinations fetched: more than a screen holds


class Feed(Protocol):
    label: str  # where the numbers come from, for the title
    note: str  # why, when it is not the daemon one would expect: a line under the status

    def fetch(self, netns: str | None, sort: str) -> Documents: ...

    def close(self) -> None: ...


class DaemonFeed:
    def __init__(self, daemon: Daemon, detail: str = "") -> None:
        self._daemon = daemon
        self.label = f"from {daemon.shown}" + (f" ({detail})" if detail else "")
        self.note = ""

    def fetch(self, netns: str | None, sort: str) -> Documents:
        query = {"sort": sort, "limit": str(LIMIT)}
        if netns:
            query["netns"] = netns
        snapshot = self._checked("/api/v1/snapshot", checked_snapshot, query)
        findings = self._checked(
            "/api/v1/findings", checked_findings, {"netns": netns} if netns else None
        )
        return snapshot, findings

    def _checked(
        self, path: str, check: Callable[[Any], dict[str, Any]], query: dict[str, str] | None
    ) -> dict[str, Any]:
        try:
            return check(self._daemon.get_json(path, query))
        except ShapeError as error:
            raise DaemonError(
                f"tcpwatch at {self._daemon.shown} answered {path} with an unexpected document "
                f"({error}); is it the same tcpwatch version?"
            ) from None

    def close(self) -> None:
        pass


class LocalFeed:
    """Polls this host each fetch, as `serve` would (rates from the second fetch on)."""

    def __init__(self, config: Config, why: str) -> None:
        self._config = config
        self._pipeline = Pipeline(long_lived=False, cached=False, log_failures=False)
        self.label = "polling this host"
        self.note = f"{why}: polling this host instead"

    def fetch(self, netns: str | None, sort: str) -> Documents:
        state = self._pipeline.poll(self._config)
        query = api.SnapshotQuery(netns=netns, limit=LIMIT, sort=sort)
        return (
            checked_snapshot(api.snapshot_document(state, query)),
            checked_findings(api.findings_document(state, netns, api.DEFAULT_FINDINGS_LIMIT)),
        )

    def close(self) -> None:
        self._pipeline.close()


def open_feed(config: Config, url: str | None) -> Feed:
    """The daemon at ``url`` (its errors are the caller's); else the local daemon when its
    listener can be verified (top/local.py) and it answers; else this host polled directly,
    the title saying why."""
    if url is not None:
        feed = DaemonFeed(parse_daemon_url(url))
        feed.fetch(None, "fill")  # fail now, with its one-line error, not inside curses
        return feed
    local = local_daemon_url(config.listen)
    daemon = parse_daemon_url(local)
    verdict = verify(local, daemon.host, daemon.port, ProcPaths(config.procfs))
    if not verdict.trusted:
        return LocalFeed(config, verdict.detail)
    feed = DaemonFeed(daemon, verdict.detail)
    try:
        feed.fetch(None, "fill")
    except DaemonError as error:
        return LocalFeed(config, f"the daemon at {local} did not answer: {error}")
    return feed
