"""tcpwatch/client.py: daemon URLs, the local daemon's address, and refusing odd documents."""

from __future__ import annotations

import base64

import pytest

from tcpwatch.client import DaemonError, parse_daemon_url, report_from_document
from tcpwatch.endpoints import local_daemon_url
from tcpwatch.errors import UsageError


def test_urls_with_and_without_credentials() -> None:
    daemon = parse_daemon_url("https://on%40call:p%3Ass@[::1]:9000")
    assert (daemon.scheme, daemon.host, daemon.port) == ("https", "::1", 9000)
    assert daemon.authorization == "Basic " + base64.b64encode(b"on@call:p:ss").decode()
    assert daemon.shown == "https://[::1]:9000"  # never the password
    plain = parse_daemon_url("http://127.0.0.1")
    assert plain.port == 9477 and plain.authorization is None


@pytest.mark.parametrize("url", ["127.0.0.1:9477", "ftp://host", "http://", "http://h:99999"])
def test_bad_urls_are_one_line_usage_errors(url: str) -> None:
    with pytest.raises(UsageError, match="--from"):
        parse_daemon_url(url)


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        (":9477", "http://127.0.0.1:9477"),
        ("0.0.0.0:9100", "http://127.0.0.1:9100"),
        ("[::]:9477", "http://[::1]:9477"),
        ("10.1.2.3:9477", "http://10.1.2.3:9477"),
    ],
)
def test_the_local_daemon_is_found_at_its_listen_address(listen: str, url: str) -> None:
    assert local_daemon_url(listen) == url


@pytest.mark.parametrize(
    "document", [[], {"schema_version": 99}, {"schema_version": 2, "findings": [{"id": "Q01"}]}]
)
def test_a_document_that_is_not_a_check_report_is_refused(document: object) -> None:
    with pytest.raises(DaemonError, match="unexpected document"):
        report_from_document(parse_daemon_url("http://127.0.0.1"), document)
