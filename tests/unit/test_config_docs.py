"""Every configuration key is where users look: config.example.yaml and docs/configuration.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tcpwatch.config import CollectSettings, Config

ROOT = Path(__file__).parent.parent.parent
EXAMPLE = (ROOT / "config.example.yaml").read_text()
DOCS = (ROOT / "docs" / "configuration.md").read_text()
# Config fields whose file key differs, or that are no key at all.
FILE_KEYS = {
    "check_window": "check.window",
    "rules_window": "rules.window",
    "source": None,
    "collect": None,
    "rules": None,
}


def test_every_top_level_key_is_in_the_example_and_the_docs() -> None:
    for field in dataclasses.fields(Config):
        key = FILE_KEYS.get(field.name, field.name)
        if key is None:
            continue
        leaf = key.rsplit(".", 1)[-1]
        assert f"{leaf}:" in EXAMPLE, f"{key} missing from config.example.yaml"
        assert f"`{key}`" in DOCS, f"{key} missing from docs/configuration.md"


def test_every_collect_key_is_in_the_example_and_the_docs() -> None:
    for field in dataclasses.fields(CollectSettings):
        assert f"  {field.name}:" in EXAMPLE, f"collect.{field.name} missing from the example"
        assert f"`collect.{field.name}`" in DOCS, f"collect.{field.name} missing from the docs"
