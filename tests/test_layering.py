"""The package's layering, read from every module's imports: no import cycles, and no module imports one on a higher
layer.

The layers, highest first (``LAYERS``); a module may import its own layer and those below it:

- the package facade (``titans_compose/__init__.py``: the public names, loaded on first use) and ``__main__``
  (``python -m titans_compose``, the command line for torchrun);
- ``cli`` (the commands), then ``sweep`` (runs many trainings);
- ``export`` and ``hf``: they take a spec, a build or a training run (its checkpoints) to another format, so they
  sit above ``train``;
- ``train`` (one training);
- the entry points over a built model: ``builder`` and ``testing``. ``testing`` imports only the
  memory op and the registry, so it could sit lower, but it is a tool for plug-in authors that nothing in the
  library may depend on, so it sits with the other entry points;
- ``nn``: the modules a build assembles;
- the compiler and the op: ``graph`` (the IR and its passes), ``spec`` and ``ops``, one layer. ``spec`` imports only
  the registry, errors and io; the graph lowers it and ``nn`` reads it, so it sits with the graph. The deprecated
  aliases ``kernels`` and ``codegen`` of ``ops.memory`` sit with ``ops``;
- ``registry`` (the registered parts; block kinds, defined in ``graph.blocks``, register themselves through the
  registry's ``BUILTIN_PROVIDERS`` hook instead of being imported by it);
- the base: ``errors``, ``io``, ``imports``, ``lock``, ``_moved`` and ``manifest``. ``manifest`` (the sha256 list of
  a build directory) imports only ``io``, so it sits in the base, where ``builder``, ``train`` and ``cli`` use it;
  ``click_types`` (option types that ``train``'s option table and ``cli`` share) imports only click.

Every import counts, module-level and function-local (a deferred import is still a dependency, and a function-local
import is the usual way a cycle hides). Imports under ``if TYPE_CHECKING:`` are exempt: they never run, and only
give annotations their types. ``importlib.import_module`` by name (plug-ins, the registry's built-in providers,
the deprecated aliases) is not an import statement and is not read.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "titans_compose"

#: highest first: (layer, the top-level names under titans_compose in it; "" is the package's own __init__).
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("facade", frozenset({"", "__main__"})),
    ("cli", frozenset({"cli"})),
    ("sweep", frozenset({"sweep"})),
    ("export and interop", frozenset({"export", "hf"})),
    ("train", frozenset({"train"})),
    ("entry points", frozenset({"builder", "testing"})),
    ("nn", frozenset({"nn"})),
    ("graph, spec and ops", frozenset({"graph", "spec", "ops", "kernels", "codegen"})),
    ("registry", frozenset({"registry"})),
    ("base", frozenset({"errors", "io", "imports", "lock", "_moved", "manifest", "click_types"})),
)

#: imports from a lower layer to a higher one that are known and about to be fixed: the task and evaluation code
#: that sweep takes from cli/train.py moves into train/ (issue 16). Remove an entry once its import is gone.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    exempt = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for stmt in node.body:
                exempt.update(id(n) for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom))
    return exempt


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (``from pkg import sub`` counts as
    importing ``pkg.sub`` when that is a module, else ``pkg``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    exempt = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import titans_compose.x.y` of a module, or of a name in one
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in known.items():
        graph.add_edges_from((name, target) for target in imports_of(name, path, known))
    return graph


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` (0 highest) of ``module``."""
    top = module.split(".")[1] if "." in module else ""
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add its top-level name to LAYERS in {__file__}")


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def upward_imports(graph: nx.DiGraph) -> set[tuple[str, str]]:
    return {(a, b) for a, b in graph.edges if layer_of(b) < layer_of(a)}


def test_every_module_is_in_a_layer(graph):
    for module in graph.nodes:
        layer_of(module)


def test_no_import_cycles(graph):
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"modules importing each other (directly or around a cycle): {cycles}"


def test_no_module_imports_a_higher_layer(graph):
    wrong = sorted(upward_imports(graph) - KNOWN_VIOLATIONS)
    described = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})" for a, b in wrong]
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(described)


def test_known_violations_are_still_there(graph):
    """An entry of KNOWN_VIOLATIONS whose import is gone must leave the list, so the list stays the truth."""
    fixed = sorted(KNOWN_VIOLATIONS - upward_imports(graph))
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS in {__file__}: {fixed}"


def test_the_reader_sees_function_local_imports_and_skips_type_checking_ones(tmp_path):
    """The checks above are only as good as the import reader: it must see deferred imports, resolve relative ones,
    and skip the TYPE_CHECKING-only ones."""
    package = tmp_path / "titans_compose"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "io.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from titans_compose import io\n"
        "def f():\n    from ..errors import CODES\n    import titans_compose.sub\n"
    )
    known = {module_name(p, tmp_path): p for p in package.rglob("*.py")}
    assert imports_of("titans_compose.sub.leaf", package / "sub" / "leaf.py", known) == {
        "titans_compose.errors",
        "titans_compose.sub",
    }
    assert imports_of("titans_compose.sub", package / "sub" / "__init__.py", known) == {"titans_compose.sub.leaf"}
