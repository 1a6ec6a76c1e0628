"""The package's layering: every import in src/blipkit (at module level or inside a function) points to the same or a
lower layer, and no modules import each other in a loop.

The layers, lowest first, are `LAYERS`; a module belongs to the layer of its top-level module or sub-package
(`blipkit.tasks.zeroshot` -> "tasks"), and `blipkit` itself (the package's `load` / `create` / `save`) sits above the
models it loads and below everything that loads them. A new module or folder must be placed in `LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import blipkit

SRC = Path(blipkit.__file__).resolve().parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("fields", "devices", "layers", "generate", "quantize"),  # no model knowledge
    ("config", "blip2_config", "lm", "processing", "checkpoint"),  # configs (OPT / T5 keep theirs in lm), files
    ("text", "vision", "qformer", "capabilities"),  # towers; what named checkpoints can do
    ("base",),
    ("blip", "blip2", "pairs"),
    ("blipkit",),  # load, create, save
    ("data", "tasks"),  # dataset readers; everything built on the models' public methods
    ("train", "export"),
    ("collections",),
    ("serve", "cli"),
)

# Imports inside a function that may point upward or close a loop, each with its reason; every other import obeys.
LAZY_EXCEPTIONS = {
    ("blipkit", "blipkit.export.runtime"): "load(DIR) hands a directory written by `blipkit export` to the ONNX "
                                            "back end, which is imported only then",
    ("blipkit", "blipkit.collections.index"): "`blipkit.Index` (the collections' search API) is imported on first "
                                               "use, by the package's __getattr__",
    ("blipkit.collections.readers", "blipkit.collections.store"): "the Lance reader asks the store for the lance "
                                                                  "module (to move below both)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}


def imports(path: Path, known: set[str]) -> dict[str, bool]:
    """blipkit modules that the file at `path` imports -> whether at module level (else inside a function)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_nodes(tree)
    top = {id(n) for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
           for n in ast.walk(stmt)}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "blipkit":
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                out[target] = out.get(target, False) or id(node) in top
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, bool]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: imports(p, set(files)) for m, p in files.items()}


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if group(module) in names)


def test_every_module_has_a_layer(graph):
    placed = {name for names in LAYERS for name in names}
    assert sorted({group(m) for m in graph} - placed) == [], "place new modules in LAYERS"


def test_no_import_points_upward(graph):
    upward = [f"{a} imports {b} ({LAYERS[layer(a)]} is below {LAYERS[layer(b)]})"
              for a, targets in graph.items() for b in targets
              if layer(b) > layer(a) and (a, b) not in LAZY_EXCEPTIONS]
    assert upward == []


def test_exceptions_are_lazy_and_still_needed(graph):
    for (a, b), why in LAZY_EXCEPTIONS.items():
        assert b in graph[a], f"{a} no longer imports {b}: drop it from LAZY_EXCEPTIONS"
        assert not graph[a][b], f"{a} imports {b} at module level ({why}); import it inside the function"


def test_no_cycles(graph):
    edges = {a: sorted(b for b in targets if (a, b) not in LAZY_EXCEPTIONS) for a, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [m, n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_the_check_sees_lazy_relative_and_absolute_imports():
    """The walker itself: imports inside functions, `from .. import name`, absolute imports, TYPE_CHECKING skipped."""
    path = SRC / "tasks" / "zeroshot.py"
    found = imports(path, {module_name(p) for p in SRC.rglob("*.py")})
    assert found["blipkit.base"] is True and found["blipkit.tasks.common"] is True
    assert all(t.startswith("blipkit") for t in found)
    facade = imports(SRC / "__init__.py", {module_name(p) for p in SRC.rglob("*.py")})
    assert facade["blipkit.blip"] is False and facade["blipkit.errors"] is True  # lazy, module level
    assert "blipkit.export.towers" not in facade
