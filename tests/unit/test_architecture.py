"""The package's structure holds to docs/architecture.md: no import cycle, no import against the
layer order written there, no module over the size it allows, and the recipes name real files.

Imports are read with ``ast`` from the source (nothing is imported), including imports inside
functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tcpwatch"
DOC = ROOT / "docs" / "architecture.md"
SIZE_LIMIT = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """tcpwatch modules that ``name`` imports (``from a import b`` counts a.b when it is one)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("tcpwatch") and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: set(imports_of(name, path, known)) for name, path in modules.items()}


def documented_layers() -> list[tuple[int, str, tuple[str, ...]]]:
    """(level, layer name, module prefixes) from the ```layers block of docs/architecture.md."""
    text = DOC.read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    layers = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        level, layer, *prefixes = line.split()
        layers.append((int(level.lstrip("L")), layer, tuple(prefixes)))
    return layers


def layer_of(module: str, layers: list[tuple[int, str, tuple[str, ...]]]) -> tuple[int, str]:
    best: tuple[int, tuple[int, str]] | None = None
    for level, layer, prefixes in layers:
        for prefix in prefixes:
            # The package itself ("tcpwatch": __version__) matches only exactly.
            below = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or below) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), (level, layer))
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[1]


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ importing its own modules is how a package is built.
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_import_follows_the_documented_layer_order() -> None:
    layers = documented_layers()
    wrong = []
    for module, targets in sorted(import_graph().items()):
        level, layer = layer_of(module, layers)
        for target in sorted(targets):
            if target.startswith(module + "."):
                continue
            target_level, target_layer = layer_of(target, layers)
            upward = target_level > level
            sibling = target_level == level and target_layer != layer
            if upward or sibling:
                wrong.append(
                    f"{module} (L{level} {layer}) imports {target} (L{target_level} {target_layer})"
                )
    assert not wrong, "imports against docs/architecture.md's layer order:\n" + "\n".join(wrong)


def test_every_module_is_in_a_layer() -> None:
    layers = documented_layers()
    for module in package_modules():
        layer_of(module, layers)


def test_no_module_over_the_size_limit_unless_the_doc_says_why() -> None:
    text = DOC.read_text()
    over = []
    for path in package_modules().values():
        lines = len(path.read_text().splitlines())
        relative = str(path.relative_to(ROOT))
        if lines > SIZE_LIMIT and f"`{relative}`" not in text.split("## Why these are long")[-1]:
            over.append(f"{relative}: {lines} lines")
    assert not over, f"modules over {SIZE_LIMIT} lines, not explained in the doc: {over}"


def test_the_recipes_name_files_that_exist() -> None:
    text = DOC.read_text()
    recipes = text.split("## Recipes", 1)[1]
    named = set(re.findall(r"`((?:tcpwatch|tests|docs|deploy|benchmarks)/[^`\s]+)`", recipes))
    assert len(named) >= 10, "the recipes name the files they touch"
    missing = []
    for name in sorted(named):
        pattern = re.sub(r"<[^>]+>", "*", name)
        if not list(ROOT.glob(pattern)):
            missing.append(name)
    assert not missing, (
        f"the recipes in docs/architecture.md name files that do not exist: {missing}"
    )


def declares_rules(path: Path) -> bool:
    """A topic module of rules/: one that declares a rule (``@rule(...)`` on a function)."""
    tree = ast.parse(path.read_text(), str(path))
    return any(
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Name)
        and decorator.func.id == "rule"
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        for decorator in node.decorator_list
    )


def test_rule_topic_modules_take_shared_helpers_from_the_bottom_of_rules_only() -> None:
    modules = package_modules()
    topics = {
        name
        for name, path in modules.items()
        if name.startswith("tcpwatch.rules.") and declares_rules(path)
    }
    assert {"tcpwatch.rules.kernel", "tcpwatch.rules.queues"} <= topics
    graph = import_graph()
    reaching = sorted(
        f"{name} imports {target}" for name in topics for target in graph[name] & topics
    )
    assert not reaching, "a topic module imports another (move the helper to rules/shared.py): " + (
        ", ".join(reaching)
    )


# What the layers above may use of tcpwatch/sources/: the registry, the declarations and the
# namespace entering that runs them. A source's own module is nobody else's business: what a
# renderer or the man page needs of it lives in the model or in paths.py.
SOURCE_ENTRY_POINTS = {
    "tcpwatch.sources.registry",
    "tcpwatch.sources.base",
    "tcpwatch.sources.netns",
    "tcpwatch.sources.lookup",  # top's one-off check of the local daemon's listener
}


def test_nothing_downstream_reaches_into_a_source_module() -> None:
    reaching = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if not module.startswith("tcpwatch.sources")
        for target in targets
        if target.startswith("tcpwatch.sources.") and target not in SOURCE_ENTRY_POINTS
    )
    assert not reaching, reaching
