"""The layout holds: the packages' layering, no import cycles, and small modules and functions.

Imports are read from the source (AST), at module level and inside functions alike; imports under
`if TYPE_CHECKING:` are for annotations only and exempt. Nothing is imported to check this.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

PACKAGES = ("tuner", "serving", "cluster", "bench")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of PACKAGES (a package is its `__init__`)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, skipping the bodies of `if TYPE_CHECKING:` (not their else)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child)


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports (`from pkg import name` is `pkg.name` where that is a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES}


GRAPH = {m: imports_of(m) for m in MODULES}


def _violations(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{m} imports {dep}"
        for m, deps in sorted(GRAPH.items())
        if m.split(".")[0] == importer
        for dep in sorted(deps)
        if dep.split(".")[0] in forbidden
    ]


def test_the_graph_is_read():
    """A guard for the tests below: the walk sees the project's modules and their imports."""
    assert "tuner.recipe" in GRAPH and "tuner.checkpoint" in GRAPH["tuner.recipe"]
    assert "tuner.recipe" in GRAPH["cluster.launch"]


# Of serving, tuner imports only its in-process decoder: evaluation decodes with the server's own code,
# so the answers it scores are the answers users get (`serving.offline`, `tuner.evaluate.generate_greedy`).
TUNER_MAY_IMPORT = {"serving.offline"}


def test_tuner_imports_no_cluster_and_of_serving_only_its_decoder():
    assert not [
        v for v in _violations("tuner", ("serving", "cluster")) if v.split()[-1] not in TUNER_MAY_IMPORT
    ]


def test_what_tuner_imports_of_serving_reaches_no_server():
    """The in-process decoder's own imports stay with the model step: no engine, HTTP, registry or auth."""
    reached, todo = set(), list(TUNER_MAY_IMPORT)
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += [d for d in GRAPH[m] if d.startswith("serving.")]
    server = {"serving.engine", "serving.api", "serving.http_server", "serving.registry", "serving.auth"}
    assert "serving.runner" in reached and not reached & server


def test_serving_does_not_import_cluster():
    assert not _violations("serving", ("cluster",))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module, or of one importing itself."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = strongly_connected(GRAPH)
    assert not cycles, "modules that import each other (directly or round a cycle): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_a_cycle_is_found():
    """The cycle finder itself, on a graph with one cycle and a chain beside it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"]]


def test_no_module_over_600_lines():
    long = {
        m: n for m, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_80_lines():
    long = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # from `def` to its last line, docstring included
                if n > MAX_FUNCTION_LINES:
                    long[f"{module}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
