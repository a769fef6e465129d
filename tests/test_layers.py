"""The layers of docs/design.md, read from the source.

Every import of the package, at module level or inside a function, goes to a module of the same
layer or of a lower one (LAYERS, top down); the graph has no cycle, not even inside a layer; the
runtime never imports the training code; and design.md's layer block names the same layers, in
the same order. A new module lands in the layer of the package it is in; a new top-level module
or package has no layer until it is added to LAYERS and to design.md.
"""

import ast
import re
from pathlib import Path

import sdaccel

SRC = Path(sdaccel.__file__).parent
DESIGN = SRC.parent.parent / "docs" / "design.md"

# Top down: (what the layer is, its modules and packages, relative to `sdaccel`). A package
# stands for every module in it, unless a module in it is listed on its own (engine.engine).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("front ends", ("__main__", "cli", "training")),
    ("front ends' jobs", ("bench", "serve", "jobs")),
    ("engine start-up and the run loop", ("runs", "compile_cache")),
    ("the engine", ("engine", "engine.engine")),
    ("speed passes (they register LoRA hooks)", ("engine.speed",)),
    ("LoRA", ("engine.lora",)),
    ("sampling", ("engine.sampling",)),
    ("text", ("engine.text",)),
    ("loading", ("engine.loading",)),
    ("measures", ("metrics", "gpu_stats", "shapes")),
    ("shared records", ("outputs", "settings", "events", "seeds", "start")),
    ("leaves", ("catalogue", "errors", "cache_dir", "__init__")),  # __init__: the version
]
FRONT_ENDS = LAYERS[0][1]
TRAINING = "training"  # a front end of its own: nothing else imports it


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
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot after the first
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("sdaccel"):
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if _is_module(name) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sdaccel")}
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _relative(module: str) -> str:
    return "__init__" if module == "sdaccel" else module.removeprefix("sdaccel.")


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest entry that is `module` or a package holding it."""
    name, best, found = _relative(module), "", None
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > len(best):
                best, found = entry, index
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not missing, f"no layer in LAYERS (and docs/design.md) for: {', '.join(missing)}"


def test_every_import_goes_to_the_same_layer_or_a_lower_one():
    upward = []
    for module, dependencies in sorted(import_graph().items()):
        for dependency in sorted(dependencies):
            here, there = layer_of(module), layer_of(dependency)
            if here is not None and there is not None and there < here:
                upward.append(f"{module} ({LAYERS[here][0]}) imports {dependency} "
                              f"({LAYERS[there][0]})")
    assert not upward, "imports to a higher layer:\n" + "\n".join(upward)


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


def test_the_runtime_never_imports_the_training_code():
    """Training (sdaccel.training) sits with the front ends, but no other front end, nor
    anything below, imports it: a run never loads the trainers."""
    inside = f"sdaccel.{TRAINING}"
    found = sorted(f"{module} imports {dependency}"
                   for module, dependencies in import_graph().items()
                   if not (module == inside or module.startswith(inside + "."))
                   for dependency in dependencies
                   if dependency == inside or dependency.startswith(inside + "."))
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- docs/design.md

NAME = re.compile(r"([a-z_]+)(/|\.py)")  # `cli/`, `compile_cache.py` at the start of a line


def design_layers() -> tuple[list[str], list[str]]:
    """The fenced block under "Layers, top down" in docs/design.md, read as: every line that
    starts (unindented) with names like `cli/` or `metrics.py, gpu_stats.py` names top-level
    modules, in order; indented `name/` lines under `engine/` name the engine's subpackages,
    in order (its `.py` lines are modules inside the engine's top layer)."""
    text = DESIGN.read_text()
    section = text[text.index("## Layers, top down"):]
    block = section.split("```")[1]
    top, engine, current = [], [], None
    for line in block.splitlines():
        indented = line.startswith(" ")
        names, rest = [], line.strip()
        while match := NAME.match(rest):
            names.append(match)
            rest = rest[match.end():].removeprefix(",").lstrip()
        if not names:
            continue
        if not indented:
            top += [m[1] for m in names]
            current = names[0][1]
        elif current == "engine":
            engine += [m[1] for m in names if m[2] == "/"]
    return top, engine


def test_design_md_names_the_same_layers_in_the_same_order():
    top, engine = design_layers()
    listed = {entry.split(".")[0] for _, entries in LAYERS for entry in entries} - {
        "__main__", "__init__"}
    assert set(top) == listed, ("docs/design.md's layer block and LAYERS differ: only in "
                                f"design.md {sorted(set(top) - listed)}, only in LAYERS "
                                f"{sorted(listed - set(top))}")
    ranks = [layer_of(f"sdaccel.{name}") for name in top]
    assert ranks == sorted(ranks), ("docs/design.md lists a layer above one LAYERS puts above "
                                    f"it: {list(zip(top, ranks, strict=True))}")
    subpackages = [entry.removeprefix("engine.") for _, entries in LAYERS for entry in entries
                   if entry.startswith("engine.") and entry != "engine.engine"]
    assert engine == subpackages, (f"docs/design.md lists engine/'s subpackages as {engine}, "
                                   f"LAYERS top down as {subpackages}")
