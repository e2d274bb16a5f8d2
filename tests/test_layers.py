"""The package's layering (docs/architecture.md): each sub-package imports only those below
it, the library never imports the app (``stages.pipeline``, ``stages.cli``), and no modules
import each other in a circle. Read from the source with ``ast``, lazy imports included."""

import ast
from pathlib import Path

import pytest

import stages

PACKAGE = Path(stages.__file__).parent
# Bottom to top: a module may import its own sub-package and those listed before it.
LAYERS = ("core", "metrics", "io", "losses", "data", "models", "config", "features",
          "mining", "training", "pipeline", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """``stages.mining.knn`` -> ``mining``; ``stages`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every ``stages`` module ``path`` imports, at any depth of its code (``from
    stages.models import clip`` imports the module ``stages.models.clip``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:  # the checks read no other
            raise AssertionError(f"{path}:{node.lineno}: a relative import; the package "
                                 "imports absolutely (stages.x.y)")
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "stages" or node.module.startswith("stages."):
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                             else node.module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stages."))
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}
    return {module: imports - {module} for module, imports in graph.items()}


def test_every_subpackage_has_a_layer():
    packages = {layer_of(m) for m in import_graph()} - {None}
    assert packages == set(LAYERS)


def test_no_import_runs_up_a_layer():
    upward = []
    for module, imports in import_graph().items():
        here = layer_of(module)
        if here is None:
            continue
        for target in imports:
            there = layer_of(target)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} -> {target}")
    assert upward == []


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each circle a depth-first walk of ``edges`` closes, as the list of its nodes."""
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_circles():
    graph = import_graph()
    # An import of a package (stages.models) is an import of its __init__ module.
    assert find_cycles({m: {t for t in targets if t in graph}
                        for m, targets in graph.items()}) == []


def test_a_circle_is_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_reader_sees_lazy_and_submodule_imports(tmp_path):
    """What the checks above rely on: an import inside a function, and a module imported by
    name from its package."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from stages.pipeline.train import train\n"
                      "from stages.models import clip, build_model\n")
    assert imported_modules(source) == {"stages.pipeline.train", "stages.models.clip",
                                        "stages.models"}
    source.write_text("from ..pipeline import train\n")  # would escape the checks
    with pytest.raises(AssertionError, match="relative import"):
        imported_modules(source)
