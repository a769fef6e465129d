"""Nothing private crosses a module (../shared/DESIGN.md's principle, issue 29), read from the
source of src/, tests/ and examples/ with `ast`:

1. no module imports, reads, assigns or deletes a private name (one leading underscore, not a
   dunder) of another module or of an object it did not define: `from x import _y`,
   `module._y`, `obj._y`, `getattr(obj, "_y")`, `monkeypatch.setattr("x._y", ...)`. A module
   may use the private names of `self`, `cls` and of the classes it defines itself;
2. no test or example replaces what an Engine has (`engine.x = ...`, `engine.x.y = ...`,
   `monkeypatch.setattr(engine, ...)`, `setattr(engine.unet, ...)`) or an attribute of one of
   sdaccel's classes (`Engine.generate = ...`, `monkeypatch.setattr(PerStep, ...)`):
   they use the engine's public seams instead.

Third-party private names that sdaccel cannot do without are in ALLOWED, each with its reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("src", "tests", "examples")

# Third-party private names (the dotted text as written, up to the private part) -> why sdaccel
# uses it. Anything written under that name (`torch._dynamo.utils.counters`) is allowed.
ALLOWED: dict[str, str] = {
    "torch._dynamo": "torch.compile's own errors, counters and test backends: PyTorch documents "
                     "them under this name and has no public equivalent",
    "torch._inductor": "inductor's configuration, errors and cache folder, documented under "
                       "this name (diffusers' speed guide sets the same flags)",
    "torch.compiler._cache": "the record of compiled artifacts that torch.compiler's public "
                             "save_cache_artifacts reads: clearing it is the only way to record "
                             "one compile alone (compile_cache.py)",
    "torch._subclasses.fake_tensor": "fake tensors, on which FLOPs are counted without "
                                     "computing (engine/sampling/cost.py); no public module",
    "torch._C._nn": "oneDNN's convolution weight reorder, which has no public name (prepack.py)",
    "torch.ops.aten": "ATen operator names: their leading underscore is part of the name "
                      "(FLOP counting names the CPU flash-attention op)",
    "torch.ops.mkldnn": "oneDNN's operators and its bf16/fp16 checks, only under these names "
                        "(engine/speed/prepack.py)",
    "torch.cpu._is_amx_tile_supported": "the only way to ask PyTorch whether the CPU has AMX "
                                        "(which kernel the CPU attention path pays off with)",
    "torch.cpu._is_avx512_bf16_supported": "the only way to ask PyTorch whether the CPU "
                                           "computes bf16 natively",
    "._version": "a tensor's version counter, bumped by every in-place write: how a prepacked "
                 "copy sees that a LoRA switch rewrote its weight",
    "._tome_info": "tomesd keeps its per-call settings there and has no other way to seed its "
                   "random token merging (bench's seeded comparison, bench/peers.py)",
    "diffusers.utils.peft_utils._create_lora_config": "the LoraConfig diffusers builds for a "
        "text encoder's LoRA (lora/injection.py mirrors diffusers' text-encoder loading step "
        "for step; rewriting this function would drift from diffusers)",
    "diffusers.utils.import_utils._bitsandbytes_available": "the flag diffusers reads to import "
        "bitsandbytes for a quantizer sdaccel never uses; no setting turns it off "
        "(cli/command.py, a quiet and quick start)",
}

DUNDER = "__"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith(DUNDER) and name != "_"


def dotted(node: ast.AST) -> str | None:
    """`a.b.c` as text, None for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


def root_name(node: ast.AST) -> str | None:
    """The name an attribute chain or call chain starts from (`engine` in `engine.unet.x`)."""
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


USED: set[str] = set()  # the ALLOWED names the files use (each must be: no stale reason)


def allowed(text: str) -> bool:
    """Whether `text` (qualified: `torch._dynamo.utils`) is or lies under an ALLOWED name; an
    ALLOWED `._name` allows that attribute of any object."""
    found = {name for name in ALLOWED if text == name or text.startswith(name + ".") or
             (name.startswith(".") and text.endswith(name))}
    USED.update(found)
    return bool(found)


def makes_engine(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Call) and dotted(node.func) in ("Engine", "engine.Engine")


def engine_names(tree: ast.Module) -> set[str]:
    """Names that hold an Engine: bound to `Engine(...)`, or a function (a fixture, whose name
    a test takes as a parameter) that returns or yields `Engine(...)` or a name bound to one."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and makes_engine(node.value):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(n, ast.Return | ast.Yield) and n.value is not None and
                (makes_engine(n.value) or dotted(n.value) in names) for n in ast.walk(node)):
            names.add(node.name)
    return names


def private_path(module: str) -> bool:
    return any(private(part) for part in module.split("."))


class Reader(ast.NodeVisitor):
    """One file's violations: (line, what)."""

    def __init__(self, tree: ast.Module, test_or_example: bool,
                 engines: set[str] = frozenset()) -> None:
        self.found: list[tuple[int, str]] = []
        self.own = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        self.test_or_example = test_or_example
        self.modules: dict[str, str] = {}  # local name -> the module or object it imports
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                self.modules |= {a.asname: a.name for a in node.names if a.asname}
                self.modules |= {a.name.split(".")[0]: a.name.split(".")[0] for a in node.names
                                 if not a.asname}
            elif isinstance(node, ast.ImportFrom) and node.module:
                self.modules |= {a.asname or a.name: f"{node.module}.{a.name}"
                                 for a in node.names}
        self.ours = {name for name, full in self.modules.items() if full.startswith("sdaccel.")}
        self.engines = set(engines) | engine_names(tree)
        self.visit(tree)

    def _qualified(self, text: str) -> str:
        """`np.x` -> `numpy.x`, `import_utils._y` -> `diffusers.utils.import_utils._y`."""
        head, _, rest = text.partition(".")
        full = self.modules.get(head, head)
        return f"{full}.{rest}" if rest else full

    def _flag(self, node: ast.AST, what: str) -> None:
        self.found.append((node.lineno, what))

    def _owner_is_ours(self, node: ast.AST) -> bool:
        """Whether `node` (what a private name is taken from) is self, cls or a class this
        module defines."""
        return isinstance(node, ast.Name) and node.id in {"self", "cls", *self.own}

    # ---------------------------------------------------------------- 1. private names

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for alias in node.names:
            text = f"{module}.{alias.name}"
            if (private(alias.name) or private_path(module)) and not allowed(text):
                self._flag(node, f"from {module} import {alias.name}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if private_path(alias.name) and not allowed(alias.name):
                self._flag(node, f"import {alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        text = dotted(node)
        if text is None:  # `f()._y`, `x[0]._y`: taken from an object made elsewhere
            if private(node.attr):
                self._flag(node, f"(...).{node.attr}")
            self.generic_visit(node)
            return
        # A whole chain at once (`torch._C._nn.op`), judged up to its last private part; its
        # inner attributes are the same chain, so they are not visited again.
        parts = text.split(".")
        foreign = [i for i, part in enumerate(parts) if i and private(part) and not (
            i == 1 and parts[0] in {"self", "cls", *self.own})]
        if foreign and not allowed(self._qualified(".".join(parts[:foreign[-1] + 1]))):
            self._flag(node, text)

    def visit_Call(self, node: ast.Call) -> None:
        name = dotted(node.func) or ""
        if name.split(".")[-1] in ("getattr", "setattr", "hasattr", "delattr") and node.args:
            self._check_named_attribute(node, name)
        if self.test_or_example and name.split(".")[-1] == "setattr" and node.args:
            self._check_replacement(node, node.args[0], f"{name}(...)")
        self.generic_visit(node)

    def _check_named_attribute(self, node: ast.Call, name: str) -> None:
        first, second = node.args[0], node.args[1] if len(node.args) > 1 else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):  # "pkg.mod._x"
            if private_path(first.value) and not allowed(first.value):
                self._flag(node, f"{name}({first.value!r}, ...)")
        elif isinstance(second, ast.Constant) and isinstance(second.value, str) and \
                private(second.value) and not self._owner_is_ours(first):
            text = f"{dotted(first)}.{second.value}" if dotted(first) else f".{second.value}"
            if not allowed(self._qualified(text)):
                self._flag(node, f"{name}({dotted(first) or '...'}, {second.value!r})")

    # ---------------------------------------------------------------- 2. replaced attributes

    def _check_replacement(self, node: ast.AST, target: ast.AST, what: str) -> None:
        root = root_name(target)
        if root in self.engines:
            self._flag(node, f"{what}: replaces what the Engine {root!r} has")
        elif root in self.ours and root[:1].isupper() and isinstance(target, ast.Name):
            self._flag(node, f"{what}: replaces an attribute of sdaccel's class {root}")

    def _check_targets(self, node: ast.AST, targets: list[ast.AST]) -> None:
        for target in targets:
            if isinstance(target, (ast.Tuple, ast.List)):  # a, b.c = ...: each one
                self._check_targets(node, target.elts)
            elif isinstance(target, ast.Attribute):
                self._check_replacement(node, target.value, f"{dotted(target) or '...'} = ...")

    def visit_Assign(self, node: ast.Assign) -> None:
        if self.test_or_example:
            self._check_targets(node, node.targets)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if self.test_or_example:
            self._check_targets(node, [node.target])
        self.generic_visit(node)


def files() -> Iterator[Path]:
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


# The fixtures tests/conftest.py shares, by name: those that give an Engine
CONFTEST_ENGINES = engine_names(ast.parse((ROOT / "tests" / "conftest.py").read_text()))


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    test_or_example = path.relative_to(ROOT).parts[0] in ("tests", "examples")
    where = path.relative_to(ROOT)
    reader = Reader(tree, test_or_example, CONFTEST_ENGINES if test_or_example else set())
    return [f"{where}:{line}: {what}" for line, what in reader.found]


def test_no_private_name_crosses_a_module_and_no_engine_is_patched():
    found = [v for path in files() for v in violations(path)]
    assert not found, f"{len(found)} uses of private names or patched engines:\n" + "\n".join(
        found)


def test_every_allowed_name_is_still_used():
    for path in files():
        violations(path)
    assert not set(ALLOWED) - USED, f"no longer used: drop them {sorted(set(ALLOWED) - USED)}"


def test_the_reader_finds_each_kind_of_violation():
    """The rules on a made-up test file: what they catch and what they leave."""
    source = '''
from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.stepwise import PerStep
from sdaccel.engine.loading.models import _arch
import torch._dynamo
import torch._secret

class Own:
    def __init__(self):
        self._mine = 1
        Own._shared = 2

def test(monkeypatch, tmp):
    engine = Engine(None)
    other = Engine(None)
    engine._unet_forward(1)
    other.layered = None
    other.prompts.weighting, x = False, 1
    other.lora.unfused = {"unet"}
    monkeypatch.setattr(engine, "on_event", print)
    monkeypatch.setattr("sdaccel.compile_cache._load_artifacts", None)
    PerStep.decide = None
    getattr(tmp, "_hidden")
    torch._dynamo.reset()
    tmp.public = 1
    Own()._mine
'''
    found = Reader(ast.parse(source), test_or_example=True).found
    assert [line for line, _ in found] == [4, 6, 16, 17, 18, 19, 20, 21, 22, 23, 26], found
