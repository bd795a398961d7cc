"""The live page's server side (tcpwatch/render/html.py): self-contained, escaped, a diagram of
every state, and state meanings quoted from docs/kernel-facts.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import MappingProxyType

from tcpwatch.config import Config
from tcpwatch.model import STATES, ProcessRef
from tcpwatch.render.html import EDGES, LAYOUT, landing_page, state_diagram
from tcpwatch.render.states import STATE_INFO
from tcpwatch.rules import RULES, Finding
from tcpwatch.state import ExportState

from .snapshots import T1, listener, snapshot, socket_table

FACTS = Path(__file__).resolve().parents[2] / "docs" / "kernel-facts.md"


def hostile_state() -> ExportState:
    table = socket_table(listeners=[listener(80, inode=5)], close_wait_inodes=[9])
    owners = {5: ProcessRef(4, "</script><img src=x onerror=alert(1)>"), 9: ProcessRef(4, "<b>")}
    finding = Finding(
        "S01", "close-wait-leak", "warning", "</script><script>alert(1)</script>", "host", "",
        MappingProxyType({"process": "<&>"}), "kill -9 '<x>'", "docs/rules/S01-close-wait-leak.md",
    )  # fmt: skip
    return ExportState((snapshot(sockets=table, owners=owners),), (finding,), last_poll=T1)


def test_meanings_are_the_sentences_of_kernel_facts() -> None:
    text = FACTS.read_text()
    section = text.split("## The TCP states\n", 1)[1]
    for state in STATES:
        info = STATE_INFO[state]
        assert f"- **{info.label}**: {info.meaning}" in section, state


def test_state_rules_exist_and_every_state_is_drawn() -> None:
    known = {rule.id for rule in RULES}
    assert all(set(info.rules) <= known for info in STATE_INFO.values())
    assert sorted(state for state, _, _ in LAYOUT) == sorted(STATES)
    assert {s for edge in EDGES for s in edge[:2]} <= set(STATES)
    svg = state_diagram()
    assert all(f'id="state-{state}"' in svg for state in STATES)
    assert svg.count('data-family="total"') == len(STATES)


def test_page_is_self_contained_and_host_strings_cannot_close_the_script() -> None:
    page = landing_page(hostile_state(), Config(), "127.0.0.1:9477", "plain HTTP", T1 + 3)
    # No external script, stylesheet, font or image: hosts often have no internet.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    # Exactly two scripts: the data and page.js; nothing from the host opens or closes one.
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<img" not in page and "<b>" not in page
    data = page.split('<script id="tw-data" type="application/json">', 1)[1].split("</script>")[0]
    document = json.loads(data)
    holders = document["snapshot"]["namespaces"][0]["close_wait_holders"]
    assert holders == [{"process": "<b>", "pid": 4, "sockets": 1}]
    assert document["findings"]["findings"][0]["title"] == "</script><script>alert(1)</script>"
    assert document["interval"] == Config().interval


def test_page_before_the_first_poll() -> None:
    page = landing_page(None, Config(), "", "plain HTTP", T1)
    assert "The first poll has not finished yet." in page
    assert '"snapshot":null' in page
