"""The layers of docs/design.md, read from the source: every import of the package, module-level
or inside a function, forms a graph without cycles, and the bottom layer stays below the engine."""

import ast
from pathlib import Path

import sdaccel

SRC = Path(sdaccel.__file__).parent
BOTTOM = ("sdaccel.settings", "sdaccel.catalogue", "sdaccel.errors", "sdaccel.events",
          "sdaccel.outputs")


def _module_name(path: Path) -> str:
    parts = ("sdaccel", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


def _is_module(name: str) -> bool:
    path = SRC.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports (`from a import b` counts as a.b when b is a
    module, else as a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdaccel"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if _is_module(name) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sdaccel")}
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_the_package_imports_without_a_cycle():
    graph, done, path = import_graph(), set(), []

    def visit(module: str) -> None:
        assert module not in path, "import cycle: " + " -> ".join(
            [*path[path.index(module):], module])
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_settings_outputs_and_events_import_nothing_above_them():
    graph = import_graph()
    allowed = set(BOTTOM) | {"sdaccel"}  # the package itself: its version
    for module in BOTTOM:
        assert graph[module] <= allowed, (module, graph[module] - allowed)
