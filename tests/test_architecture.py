"""The house rules, checked: dependencies run one way, no import cycles, no giant modules.

* The pure core (``knlight.lm``, ``knlight.neurons``, ``knlight.editing``, ``knlight.factcheck``,
  ``knlight.selection``, ``knlight.planted``, ``knlight.runfolder``, ``knlight.metrics``, the data layer but its
  Lightning datamodule, ``knlight.io``, ``knlight.errors``) imports nothing from Lightning, ``knlight.tasks``,
  ``knlight.callbacks``, ``knlight.cli`` or ``knlight.commands`` — not even lazily inside a function.
* ``knlight.callbacks`` do not import ``knlight.tasks`` (tasks contribute callbacks, not the other way round).
* No import cycle among knlight's modules (an import of ``a.b.c`` also runs ``a/__init__`` and
  ``a/b/__init__``, so those count as dependencies too).
* No module over 400 lines.

Imports are read from the source (every ``import`` statement, also inside functions), so the check needs no
import to succeed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knlight"
PURE = ("knlight.lm", "knlight.neurons", "knlight.editing", "knlight.factcheck", "knlight.selection",
        "knlight.planted", "knlight.runfolder", "knlight.metrics", "knlight.data", "knlight.io",
        "knlight.errors")  # fmt: skip
LIGHTNING_SIDE = ("knlight.data.datamodule",)
FORBIDDEN_FOR_PURE = ("lightning", "pytorch_lightning", "knlight.tasks", "knlight.callbacks", "knlight.cli",
                      "knlight.commands")  # fmt: skip
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names), from every import statement in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    """knlight module -> the knlight modules it depends on (with the packages' ``__init__`` on the way)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for imported in imports_of(path, name):
            if not imported.startswith("knlight"):
                continue
            parts = imported.split(".")
            for end in range(1, len(parts) + 1):
                candidate = ".".join(parts[:end])
                # A package the importer lives in is being imported already (Python runs it first).
                if candidate in known and candidate != name and not name.startswith(candidate + "."):
                    targets.add(candidate)
        edges[name] = targets
    return edges


def is_in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_pure_core_imports_no_lightning_task_callback_or_cli() -> None:
    broken = []
    for name, path in sorted(modules().items()):
        if not is_in(name, PURE) or is_in(name, LIGHTNING_SIDE):
            continue
        bad = sorted(i for i in imports_of(path, name) if is_in(i, FORBIDDEN_FOR_PURE))
        if bad:
            broken.append(f"{name} imports {', '.join(bad)}")
    assert not broken, "\n".join(broken)


def test_callbacks_do_not_import_tasks() -> None:
    broken = [f"{name} imports {i}" for name, path in sorted(modules().items()) if is_in(name, ("knlight.callbacks",))
              for i in sorted(imports_of(path, name)) if is_in(i, ("knlight.tasks",))]  # fmt: skip
    assert not broken, "\n".join(broken)


def test_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_400_lines(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (the house rule: at most {MAX_LINES}); split it"
