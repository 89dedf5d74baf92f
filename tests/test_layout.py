"""The package's layering: no import cycle between its parts, and ``export/`` and ``compress/`` stay leaves that
never reach back into the training run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoglm_distill"
# What each leaf package may import from the project (a unit is a top-level module or a subpackage).
ALLOWED = {
    "export": {"models", "utils", "data", "actions", "config"},  # config: its CLI's Hydra folder
    "compress": {"models", "utils", "data"},  # data: model_inputs, next to the Collator that makes the batches
    "data": {"utils", "actions"},  # actions: episode steps must hold actions that parse
}


def unit_of(module: str) -> str | None:
    """``autoglm_distill.export.onnx`` -> ``export``; None outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "autoglm_distill" and len(parts) > 1 else None


def imports() -> dict[str, set[str]]:
    """unit -> the other units its files import (module level and inside functions alike)."""
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = path.relative_to(PACKAGE).with_suffix("").parts[0]
        found = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {unit_of(name) for name in names} & units - {unit}
    return graph


def test_no_import_cycle_between_parts():
    graph = imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            unit = todo.pop()
            if unit not in seen:
                seen.add(unit)
                todo += graph.get(unit, ())
        return seen

    cycles = sorted(unit for unit in graph if unit in reach(unit))
    assert not cycles, f"import cycles through {cycles}: { ({u: sorted(graph[u]) for u in cycles}) }"


@pytest.mark.parametrize("leaf", sorted(ALLOWED))
def test_leaf_packages_import_only_what_they_may(leaf):
    extra = imports()[leaf] - ALLOWED[leaf]
    assert not extra, f"autoglm_distill/{leaf}/ imports {sorted(extra)}; allowed: {sorted(ALLOWED[leaf])}"
