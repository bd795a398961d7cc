"""The rule pages as `tcpwatch serve` shows them: /rules/ (the catalogue) and /rules/<ID>.

The pages are docs/rules/*.md, shipped inside the package as ``tcpwatch/ruledocs``, so every
install can show them with no network: a finding's link, an alert's runbook_url and the
dashboard's rule links can point at the daemon that reported it. The Markdown is shown as it is
written, escaped inside ``<pre>``: it reads well as text, and no markup from a file reaches the
page. A name is looked up in the rule catalogue and never used as a path.
"""

from __future__ import annotations

import html
from importlib import resources

from tcpwatch import __version__
from tcpwatch.render.status import doc_url, offline_page
from tcpwatch.rules import RULES, Rule

_STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:1.5em auto;padding:0 1em;"
    "color:#222}pre{white-space:pre-wrap;font:13px/1.45 ui-monospace,monospace;"
    "background:#f6f6f6;padding:1em;border-radius:4px}nav{margin-bottom:1em}"
    "td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}"
)


def rule_named(name: str) -> Rule | None:
    """A rule by id (``Q01``, any case) or slug (``accept-queue-full``)."""
    for rule in RULES:
        if name.upper() == rule.id or name.lower() == rule.slug:
            return rule
    return None


def read_rule_page(rule: Rule) -> str | None:
    """The rule's page (Markdown, ending with a newline) as installed; None when this copy of
    tcpwatch was installed without its pages."""
    name = rule.doc.rsplit("/", 1)[-1]
    try:
        text = resources.files("tcpwatch").joinpath("ruledocs", name).read_text(encoding="utf-8")
    except OSError:
        return None
    return text if text.endswith("\n") else text + "\n"


def _document(title: str, nav: list[str], body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><nav>{' · '.join(nav)}</nav>\n{body}\n"
        f"<p><small>tcpwatch {html.escape(__version__)}</small></p></body></html>\n"
    )


def _link(href: str, text: str) -> str:
    return f'<a href="{html.escape(href, quote=True)}">{html.escape(text)}</a>'


def rule_index_html(docs_url: str = "") -> str:
    """/rules/: every rule with its severity and title, each linking its page."""
    rows = "".join(
        f"<tr><td>{_link(rule.id, rule.id)}</td><td>{html.escape(rule.slug)}</td>"
        f"<td>{html.escape(rule.severity)}</td><td>{html.escape(rule.title)}</td></tr>"
        for rule in RULES
    )
    nav = [_link("../", "live page")]
    if docs_url:
        nav.append(_link(f"{docs_url.rstrip('/')}/docs/rules/README.md", "published copy"))
    body = (
        "<h1>tcpwatch rules</h1>\n<table><tr><th>id</th><th>slug</th><th>severity</th>"
        f"<th>fires when</th></tr>{rows}</table>\n"
        "<p>Offline, on any host with tcpwatch: <code>tcpwatch rules ID</code>.</p>"
    )
    return _document("tcpwatch rules", nav, body)


def rule_page_html(name: str, docs_url: str = "") -> str | None:
    """/rules/<name>: the rule's page; the index for an empty name; None for an unknown rule."""
    if not name:
        return rule_index_html(docs_url)
    rule = rule_named(name)
    if rule is None:
        return None
    text = read_rule_page(rule)
    if text is None:
        text = f"This copy of tcpwatch was installed without its rule pages: {rule.doc}.\n"
    nav = [_link("../", "live page"), _link("./", "all rules")]
    published = doc_url(rule.doc, docs_url)
    if published:
        nav.append(_link(published, "published copy"))
    nav.append(f"offline: <code>{html.escape(offline_page(rule.id))}</code>")
    title = f"tcpwatch {rule.id} {rule.slug}"
    return _document(title, nav, f"<pre>{html.escape(text)}</pre>")
