"""The package's layers: no import cycle inside ``emtune/`` and no import from a lower layer to a
higher one, module-level and function-level imports alike (read from the source with ``ast``).

The order (lowest first) is the README's "Architecture" section; a module may import its own
layer and the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emtune"

#: Lowest first. A top-level module is named ``emtune.<module>``, a subpackage ``emtune.<package>``.
LAYERS: list[tuple[str, ...]] = [
    ("emtune.spec_errors", "emtune.numbers", "emtune.tensor_ops", "emtune.trial_files", "emtune.user_files"),
    ("emtune.data",),
    ("emtune.tracking",),
    ("emtune.models",),
    ("emtune.evaluation",),
    ("emtune.defenses",),
    ("emtune.train",),
    ("emtune.config", "emtune.search_spec", "emtune.spec_checks", "emtune.spec_inputs", "emtune.spec_reference"),
    ("emtune.study",),
    ("emtune.report",),
    ("emtune.cli",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every emtune module ``name`` imports, at any depth of its code."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_package else name.split(".")[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != "emtune":
                found.add(target)
    return found


def layer_of(module: str) -> int:
    """Index of the layer a module belongs to (its longest matching prefix)."""
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and the README)")
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = {name: _imports(name) for name in MODULES}
    assert cycles(graph) == []


def test_no_import_reaches_a_higher_layer() -> None:
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name in sorted(MODULES) if name != "emtune"
              for target in sorted(_imports(name)) if layer_of(target) > layer_of(name)]
    assert upward == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_cycle_finder_finds_cycles(graph, expected) -> None:
    assert cycles(graph) == expected


def test_layer_check_catches_an_upward_import(tmp_path) -> None:
    # the checker itself must see a function-level import from data up to study
    assert layer_of("emtune.data.loading") < layer_of("emtune.study.runner")
    source = "def f():\n    from emtune.study.runner import init_ray\n"
    tree = ast.parse(source)
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names == ["emtune.study.runner"] and layer_of(names[0]) > layer_of("emtune.data.loading")


def test_module_sizes() -> None:
    big = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 350}
    assert big == {}, f"modules over 350 lines (split them by concept): {big}"
