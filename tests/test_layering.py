"""The package's architecture, enforced: layers that import only downwards, no import cycle, models/ self-contained,
short functions. Imports are read from the source (every ``import``, also those inside functions), nothing is run.

Layers, bottom to top (a module may import its own layer and the ones below):
models -> data -> weights -> config -> evaluation -> train -> commands (+ runtime) -> cli, __main__, __init__.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fcmae"
LAYERS = ["models", "data", "weights", "config", "evaluation", "train", "commands", "cli"]
# top-level modules that are not packages: their layer
MODULE_LAYER = {"config": "config", "runtime": "commands", "cli": "cli", "__main__": "cli", "__init__": "cli"}
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = ["fcmae", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else "__init__"
    return LAYERS.index(MODULE_LAYER.get(first, first))


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The fcmae modules ``path`` imports (``from fcmae.x import y`` names module ``fcmae.x.y`` when it exists)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "fcmae")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fcmae":
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            out.update(subs or {node.module})
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(p, known) - {m} for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_only_downwards():
    upward = [f"{m} ({LAYERS[_layer(m)]}) imports {d} ({LAYERS[_layer(d)]})"
              for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert upward == []


def test_models_import_nothing_of_ours_outside_models():
    outside = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith("fcmae.models")
               for d in sorted(deps) if not d.startswith("fcmae.models")]
    assert outside == []


def test_every_module_has_a_layer():
    for m in _modules():
        assert 0 <= _layer(m) < len(LAYERS), m


def test_no_module_shadows_the_standard_library():
    import sys

    names = {p.stem for p in PKG.rglob("*.py")} | {p.name for p in PKG.rglob("*") if p.is_dir()}
    assert sorted(names & set(sys.stdlib_module_names)) == []


def test_functions_are_short():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def _literal_shapes(tree: ast.AST) -> list[int]:
    """Lines where a literal four-int tuple/list (one per stage) is given to something named ``depths`` or ``dims``
    (a parameter default, a keyword argument, an assignment)."""
    def literal(v: ast.AST | None) -> bool:
        return (isinstance(v, (ast.Tuple, ast.List)) and len(v.elts) == 4  # four stages
                and all(isinstance(e, ast.Constant) for e in v.elts))

    def named(n: str | None) -> bool:
        return n in ("depths", "dims")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            args = node.posonlyargs + node.args
            pairs = [*zip(args[len(args) - len(node.defaults):], node.defaults),
                     *zip(node.kwonlyargs, node.kw_defaults)]
            lines += [d.lineno for a, d in pairs if named(a.arg) and literal(d)]
        elif isinstance(node, ast.keyword) and named(node.arg) and literal(node.value):
            lines.append(node.value.lineno)
        elif isinstance(node, ast.Assign) and literal(node.value):
            names = [t.id if isinstance(t, ast.Name) else getattr(t, "attr", None) for t in node.targets]
            lines += [node.lineno for n in names if named(n)]
    return lines


def test_only_the_registry_lists_variant_shapes():
    """Depths and widths per variant are written in one place: the registry's records."""
    found = {str(p.relative_to(PKG)): _literal_shapes(ast.parse(p.read_text())) for p in PKG.rglob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}
    assert _literal_shapes(ast.parse("def f(depths=(1, 2, 3, 4)): pass\nf(dims=[8, 16, 24, 32])")) == [1, 2]
