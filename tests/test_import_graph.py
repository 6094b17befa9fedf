"""No import cycles in ``src/medisyn`` (issue #22; STYLE.md: imports run downward), and the library proper
does not import the demo and test scaffolding in ``medisyn.demo`` (issue #22).

The graph is built from the source with :mod:`ast`, without importing anything: every ``import`` and
``from ... import`` statement anywhere in a file counts (module level and inside functions, since a
function-level import still runs, only later), except those inside an ``if TYPE_CHECKING:`` block,
which never execute. Relative imports are resolved against the importing module's package.
``from medisyn.a import b`` is an edge to ``medisyn.a.b`` when that is a module or package, else to
``medisyn.a``; a package's node is its ``__init__``. Only edges between medisyn modules count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(src: Path = SRC) -> dict[str, Path]:
    """{dotted module name: file} for every module of the medisyn package (a package as its ``__init__``)."""
    found = {}
    for path in sorted((src / "medisyn").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, skipping the body of ``if TYPE_CHECKING:`` (not its ``else``)."""
    nodes: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            nodes.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The medisyn modules that module ``name`` (source at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names]
        for candidate in candidates:
            # `import medisyn.a.b.c` where c is a name would not parse, but a dotted name may end
            # in a package: take the longest prefix that is a medisyn module.
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    files = module_names(src)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search, each as a path ``[a, b, ..., a]``.

    A directed graph is acyclic exactly when a depth-first search finds no back edge, so an empty
    result means no cycle at all. Nodes and edges are visited in sorted order (a stable report).
    """
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt)
        on_path.discard(path.pop())
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def test_src_medisyn_has_no_import_cycles():
    graph = import_graph()
    assert "medisyn.stages" in graph and "medisyn.evaluate.fid" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/medisyn:\n" + "\n".join(" -> ".join(c) for c in cycles)


#: The modules outside medisyn.demo allowed to import it (issue #22), and why.
DEMO_IMPORTERS_ALLOWED = {
    "medisyn.stages": "the runner's demo stages, build-tiny-models and demo-data",
}


def _in_demo(module: str) -> bool:
    return module == "medisyn.demo" or module.startswith("medisyn.demo.")


def demo_imports_outside(graph: dict[str, set[str]], allowed=DEMO_IMPORTERS_ALLOWED) -> dict[str, set[str]]:
    """{module outside medisyn.demo and not allowed: the medisyn.demo modules it imports}."""
    return {name: found for name, targets in sorted(graph.items())
            if not _in_demo(name) and name not in allowed and (found := {t for t in targets if _in_demo(t)})}


def test_only_the_allowed_modules_import_medisyn_demo():
    graph = import_graph()
    assert {"medisyn.demo.phantoms", "medisyn.demo.pretrain", "medisyn.demo.services"} <= set(graph)
    assert not demo_imports_outside(graph), "the library imports its demo scaffolding:\n" + "\n".join(
        f"{name} -> {', '.join(sorted(t))}" for name, t in demo_imports_outside(graph).items())
    # each exception is still needed (else it goes from the list)
    assert all(any(_in_demo(t) for t in graph[name]) for name in DEMO_IMPORTERS_ALLOWED)


def test_demo_imports_outside_on_a_hand_made_graph():
    graph = {"medisyn.stages": {"medisyn.demo.phantoms"}, "medisyn.models": {"medisyn.demo"},
             "medisyn.demo": {"medisyn.demo.pretrain"}, "medisyn.demo.pretrain": {"medisyn.models.sdxl"},
             "medisyn.demography": {"medisyn.storage"}}
    assert demo_imports_outside(graph, {"medisyn.stages": ""}) == {"medisyn.models": {"medisyn.demo"}}


# The check itself, on hand-made graphs: a cycle it must find, and graphs it must pass.
CASES = [
    ("three-cycle", {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
    ("two-cycle beside a chain", {"x": {"y"}, "y": {"x", "z"}, "z": set()}, [["x", "y", "x"]]),
    ("self-loop", {"a": {"a"}}, [["a", "a"]]),
    ("diamond (acyclic)", {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, []),
    ("empty", {}, []),
]


@pytest.mark.parametrize(("graph", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_find_cycles_on_hand_made_graphs(graph, expected):
    assert find_cycles(graph) == expected


def test_import_graph_resolves_relative_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "medisyn"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import Y\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .. import low\n"  # a module: edge to medisyn.low
        "if TYPE_CHECKING:\n"
        "    from medisyn import high\n"  # never executes: no edge
        "else:\n"
        "    import os\n"
        "def f():\n"
        "    from medisyn.high import g\n"  # a name in medisyn.high: edge to medisyn.high
        "    return g\n"
        "Y = 2\n")
    (pkg / "high.py").write_text("import medisyn.sub.leaf\n\ndef g():\n    from . import sub\n")
    graph = import_graph(tmp_path)
    assert graph == {
        "medisyn": set(),
        "medisyn.low": set(),
        "medisyn.sub": {"medisyn.sub.leaf"},
        "medisyn.sub.leaf": {"medisyn.low", "medisyn.high"},
        "medisyn.high": {"medisyn.sub.leaf", "medisyn.sub"},
    }
    assert find_cycles(graph) == [["medisyn.high", "medisyn.sub", "medisyn.sub.leaf", "medisyn.high"]]
