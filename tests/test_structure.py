"""The package's layers: every import (lazy ones inside functions too) runs downwards, so there is no
circle and no module reaches up into the code that drives it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package may import the packages listed for it, and nothing else of the project's.
ALLOWED = {
    "configs": set(),
    "rewards": {"configs"},
    "iqa": {"configs", "rewards"},
    "vlm": {"configs", "iqa"},
    "actor": {"configs", "rewards", "iqa", "vlm"},
    "learner": {"configs", "rewards", "iqa", "vlm"},
    "models": {"configs", "rewards", "iqa", "vlm", "learner"},
    "cluster": {"configs", "rewards", "iqa", "vlm", "actor", "learner", "models"},
}
PROJECT = set(ALLOWED) | {"bench", "research", "tests"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in sorted(imported_packages(path) - allowed - {package}):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports that run upwards or sideways:\n" + "\n".join(wrong)


def reachable(graph: dict, start: str) -> set[str]:
    """Every node `start` leads to in `graph` (node -> the nodes it points at), directly or not."""
    seen, todo = set(), list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_the_layer_table_has_no_circle():
    # A package may not be allowed to import one that is allowed to import it, directly or not.
    assert [p for p in ALLOWED if p in reachable(ALLOWED, p)] == []


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports, lazy imports inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from cluster import x
    return names & modules


def test_no_module_imports_one_that_imports_it_back():
    # Within a package too: e.g. cluster/cli.py runs cluster/train.py, so train.py may not import cli.py.
    paths = {module_name(path): path for package in ALLOWED for path in (ROOT / package).rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}
    circles = sorted(name for name in graph if name in reachable(graph, name))
    assert not circles, "modules on an import circle:\n" + "\n".join(circles)
