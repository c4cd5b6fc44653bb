"""The house: the package's import graph has no cycle and flows one way (ARCHITECTURE.md).

Every ``import`` of the installed package's source files is read with ``ast`` (function-level imports
included, since a cycle hidden in a function is still a cycle), resolved to a module of
``benchbench`` and checked against the layers below: a module may import only modules of its own
layer or of a lower one. The three axes (methods, tasks, backbones) sit on the core contracts, never
on each other, and the core reaches them only through the registries' ``"module:attr"`` strings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"benchbench": "benchbench", "methods": "benchbench.methods", "tasks": "benchbench.tasks",
           "backbones": "benchbench.backbones", "leaderboard": "benchbench.leaderboard"}

# layer of each module (longest matching prefix); an import must go to the same layer or a lower one
LAYERS = {
    "benchbench.data": 0, "benchbench.registry": 0, "benchbench.names": 0, "benchbench.metrics": 0, "benchbench.stats": 0,
    "benchbench.measure": 0, "benchbench.inertia": 0, "benchbench.weights": 0, "benchbench.whisper_weights": 0, "benchbench.lm_weights": 0,
    "benchbench.backbone": 1, "benchbench.task": 1, "benchbench.method": 1,
    "benchbench.training": 2, "benchbench.tracking": 2,
    # the three axes: on the contracts (layers 0-2), never on analysis, the runner or each other
    "benchbench.methods": 3, "benchbench.tasks": 3, "benchbench.backbones": 3,
    "benchbench.analysis": 4,
    "benchbench.leaderboard": 5,
    "benchbench.cells": 6, "benchbench.harness": 6, "benchbench.sweep": 6, "benchbench.tuning": 6, "benchbench.testing": 6, "benchbench.speed": 6,
    "benchbench.probe": 6,            # fits lora on a cell (bench probe --projector): a runner, like speed
    "benchbench.cli": 7,
    "benchbench.tools": 8,          # research tools: may import anything, nothing imports them
    "benchbench": 0,
}
AXES = ("benchbench.methods", "benchbench.tasks", "benchbench.backbones")


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = f
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the ``benchbench`` modules it imports (and their parent packages, whose ``__init__`` runs)."""
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if not t.startswith("benchbench"):
                    continue
                while t and t not in files:  # `from pkg.mod import name`: the module is pkg.mod
                    t = t.rpartition(".")[0]
                parts = t.split(".")
                for i in range(2, len(parts) + 1):  # the module and the packages above it
                    if ".".join(parts[:i]) != module:
                        graph[module].add(".".join(parts[:i]))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first = last), or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def layer(module: str) -> int:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[key]


def axis(module: str) -> str | None:
    return next((a for a in AXES if module == a or module.startswith(a + ".")), None)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_is_read_in_full():
    graph = import_graph()
    assert {"benchbench.cli", "benchbench.methods.mal", "benchbench.backbones.qwen2_audio",
            "benchbench.leaderboard.render", "benchbench.tools.fixtures"} <= set(graph)
    assert "benchbench.analysis" in graph["benchbench.leaderboard.render"]
    assert "benchbench.methods.titans_memory" in graph["benchbench.methods.mal"]  # relative-free absolute import
    assert "benchbench.backbones.tiny" in graph["benchbench.backbones.qwen2_audio"]  # `from .tiny import ...`


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_flow_one_way():
    bad = []
    for module, targets in import_graph().items():
        for t in targets:
            if layer(t) > layer(module):
                bad.append(f"{module} (layer {layer(module)}) imports {t} (layer {layer(t)})")
            elif axis(t) and axis(t) != axis(module) and layer(module) <= LAYERS["benchbench.leaderboard"]:
                bad.append(f"{module} imports {t}: the core and the other axes reach an axis only through "
                           "its registry")
    assert bad == []


@pytest.mark.parametrize("entry", ["benchbench.cli", "benchbench.harness", "benchbench.sweep",
                                   "benchbench.leaderboard"])
def test_research_tools_are_outside_a_runs_import_graph(entry):
    graph, seen, todo = import_graph(), set(), [entry]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    assert not [m for m in seen if m.startswith("benchbench.tools")]
