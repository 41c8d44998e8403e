"""The package's shape, read from its source with :mod:`ast` (nothing is imported).

- No import circle between modules of ``adapterfuse`` (imports inside functions count too).
- No module imports a module of a higher layer (``LAYERS``); inside the backends layer, one backend may
  import another only along ``BACKEND_DEPENDS``.
- No function or method body longer than ``MAX_BODY_LINES`` lines.
- No public function or method (a public class's ``__init__`` included) with more than ``MAX_PARAMS`` parameters.

The ``KNOWN_*`` sets list today's exceptions as ``module:qualname`` (or ``importer -> imported`` for
imports); each entry is a debt to pay off, and a test fails once an entry is no longer needed, so the
sets can only shrink.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "adapterfuse"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

MAX_BODY_LINES = 60
MAX_PARAMS = 8

# Layer of each module, by the longest matching dotted prefix (relative to the package). A module may
# import modules of its own layer or lower layers, never higher ones. The top-level ``__init__`` (the
# public API) may import anything and nothing imports it.
LAYERS: dict[str, int] = {
    # 0: leaves
    "_version": 0,
    "errors": 0,
    # 1: plain data and file handling
    "tasks.spec": 1,
    "tasks.metrics": 1,
    "adapter_config": 1,
    "delta": 1,
    "serving": 1,
    "io.atomic": 1,
    "progress": 1,
    "device": 1,
    "distributed": 1,
    # 2: one model, one expert, one task
    "base": 2,
    "tasks.glue": 2,
    "lowrank": 2,
    "head": 2,
    "uncertainty": 2,
    "surgery": 2,
    "expert": 2,
    "io.manifest": 2,
    "io.hub": 2,
    "io.card": 2,
    "io.retry": 1,
    # 3: many experts, predictors, evaluation
    "library": 3,
    "predictor": 3,
    "harness": 3,
    "calibration": 3,
    "detection": 3,
    # 4: the backends (they combine trained experts; nothing in them trains one)
    "backends": 4,
    # 5: training, which may build on the backends (distilling an ensemble, parameter-efficient
    #    ensembles that pool like backends.ensemble and merge like backends.merge)
    "train": 5,
    # the out-of-task detector reads the base's features as a router does (backends.route.features)
    "feature_detector": 5,
    "guarded": 5,
    # 6, 7: what drives it all (loading reads any saved predictor, so it sits above what saves them)
    "loading": 6,
    "recipe": 6,
    "cli": 7,
    # sub-package __init__ files (docstring only), at the bottom so that anything may import them
    "io": 0,
    "tasks": 0,
}

# Inside layer 4: which backend may import which (``backends.base``, the Combiner protocol, and
# ``backends.options``, the validation of config models, are open to all). Ensemble and merge are
# independent; route pools and scores its members with the ensemble machinery, and its MBC router
# merges each cluster of experts with ``backends.merge``.
BACKEND_DEPENDS: dict[str, set[str]] = {
    "backends.ensemble": set(),
    "backends.merge": set(),
    "backends.route": {"backends.ensemble", "backends.merge"},
}

# Today's exceptions (see the module docstring).
KNOWN_CYCLES: set[str] = set()
KNOWN_UPWARD: set[str] = set()
KNOWN_OVER_60: set[str] = set()
KNOWN_OVER_8_PARAMS: set[str] = set()


@dataclass(frozen=True)
class Import:
    target: str  # dotted module name relative to the package
    line: int


@dataclass(frozen=True)
class Function:
    qualname: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    is_method: bool
    is_public: bool


def module_name(path: Path) -> str:
    """``adapterfuse/backends/merge/api.py`` -> ``backends.merge.api``; the package ``__init__`` -> ``""``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The full dotted name ``from`` imports from (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    parts = [PACKAGE, *module.split(".")] if module else [PACKAGE]
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _local(name: str) -> str | None:
    """``adapterfuse.x.y`` -> ``x.y``; the package itself -> ``""``; anything else -> None."""
    if name == PACKAGE:
        return ""
    if name.startswith(PACKAGE + "."):
        return name[len(PACKAGE) + 1 :]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a package module in ``path``, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [Import(t, node.lineno) for a in node.names if (t := _local(a.name)) is not None]
        elif isinstance(node, ast.ImportFrom):
            source = _local(_absolute(module, path.name == "__init__.py", node))
            if source is None:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}" if source else alias.name
                # ``from adapterfuse.io import atomic`` imports the module io.atomic, not the package io
                found.append(Import(sub if sub in modules else source, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, for modules of the package only, self-imports dropped."""
    modules = all_modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for imp in imports_of(module, path, modules):
            if imp.target != module:
                edges.setdefault(imp.target, imp.line)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components with more than one module (each one holds a circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
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
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """One concrete circle through the component's first module, as a path that ends where it starts."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest circle back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return [*paths[v], start]
                if w in members and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")


def layer_of(module: str) -> int | None:
    """The layer of the longest ``LAYERS`` prefix of ``module``; None for the top-level ``__init__``."""
    if module == "":
        return None
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{PACKAGE}.{module} has no layer: add it to LAYERS in tests/test_structure.py")


def _backend(module: str) -> str | None:
    parts = module.split(".")
    shared = ("base", "options")  # open to every backend
    return ".".join(parts[:2]) if parts[0] == "backends" and len(parts) > 1 and parts[1] not in shared else None


def upward_imports(graph: dict[str, dict[str, int]]) -> dict[str, str]:
    """``importer -> imported`` for every import that breaks the layer table, with where it is."""
    bad = {}
    modules = all_modules()
    for module, edges in graph.items():
        for target, line in edges.items():
            where = f"{modules[module].relative_to(ROOT.parent)}:{line}"
            if target == "":
                bad[f"{module} -> {PACKAGE}"] = f"{where}: imports the top-level package (the public API)"
                continue
            mine, theirs = layer_of(module), layer_of(target)
            if mine is None:
                continue
            if theirs > mine:
                bad[f"{module} -> {target}"] = f"{where}: layer {mine} imports layer {theirs}"
            own, other = _backend(module), _backend(target)
            if own and other and own != other and other not in BACKEND_DEPENDS[own]:
                bad[f"{module} -> {target}"] = f"{where}: {own} may import only {sorted(BACKEND_DEPENDS[own])}"
    return bad


def functions_of(tree: ast.Module) -> list[Function]:
    """Every function and method with its qualified name (``Class.method``, ``outer.<locals>.inner``)."""
    found = []

    def walk(node: ast.AST, prefix: str, in_class: bool, public: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + child.name
                # a public class's __init__ is its constructor: as public as the class
                is_public = public and (not child.name.startswith("_") or (in_class and child.name == "__init__"))
                found.append(Function(qualname, child, in_class, is_public))
                # nested functions are not reachable from outside: never public
                walk(child, qualname + ".<locals>.", False, False)
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".", True, public and not child.name.startswith("_"))
            else:
                walk(child, prefix, in_class, public)

    walk(tree, "", False, True)
    return found


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = node.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def param_count(fn: Function) -> int:
    """Parameters a caller can pass: self/cls of a method (not a staticmethod) do not count, *args and
    **kwargs count one each."""
    args = fn.node.args
    names = [*args.posonlyargs, *args.args]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.node.decorator_list)
    if fn.is_method and not static and names:
        names = names[1:]
    return len(names) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)


def all_functions() -> list[tuple[str, Function]]:
    out = []
    for module, path in all_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        out += [(module or PACKAGE, fn) for fn in functions_of(tree)]
    return out


def long_functions() -> dict[str, int]:
    """``module:qualname`` -> body lines, for every function over ``MAX_BODY_LINES``."""
    return {f"{m}:{fn.qualname}": n for m, fn in all_functions() if (n := body_lines(fn.node)) > MAX_BODY_LINES}


def wide_functions() -> dict[str, int]:
    """``module:qualname`` -> parameters, for every public function over ``MAX_PARAMS``."""
    return {
        f"{m}:{fn.qualname}": n for m, fn in all_functions() if fn.is_public and (n := param_count(fn)) > MAX_PARAMS
    }


def _report(title: str, found: dict[str, str], known: set[str]) -> list[str]:
    lines = [f"{title}:"] if set(found) - known or known - set(found) else []
    lines += [f"  new: {key}  ({found[key]})" for key in sorted(set(found) - known)]
    lines += [f"  fixed, remove from the known list: {key}" for key in sorted(known - set(found))]
    return lines


def test_no_import_cycles():
    graph = import_graph()
    found = {}
    for component in strongly_connected(graph):
        cycle = cycle_in(component, graph)
        edges = [f"{a}:{graph[a][b]}" for a, b in itertools.pairwise(cycle)]
        found[" <-> ".join(component)] = "circle " + " -> ".join(cycle) + " (importer:line " + ", ".join(edges) + ")"
    problems = _report("import circles (strongly connected modules)", found, KNOWN_CYCLES)
    assert not problems, "\n".join(problems)


def test_no_upward_imports():
    problems = _report("imports against the layer table", upward_imports(import_graph()), KNOWN_UPWARD)
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_functions_are_short():
    found = {k: f"{n} body lines" for k, n in long_functions().items()}
    problems = _report(f"functions longer than {MAX_BODY_LINES} lines", found, KNOWN_OVER_60)
    assert not problems, "\n".join(problems)


def test_public_functions_take_few_parameters():
    found = {k: f"{n} parameters" for k, n in wide_functions().items()}
    problems = _report(f"public functions with more than {MAX_PARAMS} parameters", found, KNOWN_OVER_8_PARAMS)
    assert not problems, "\n".join(problems)


def test_checks_can_fail(tmp_path):
    """The readers behind the checks find what they look for."""
    source = ast.parse(
        "class A:\n"
        "    def m(self, a, b, c, d, e, f, g, h, *args, **kw):\n"
        '        """doc"""\n' + "        x = 1\n" * 61 + "\n"
        "    def __init__(self, a, b, c, d, e, f, g, h, i):\n"
        "        pass\n"
        "    @staticmethod\n"
        "    def s(a, b, c, d, e, f, g, h):\n"
        "        def inner(a, b, c, d, e, f, g, h, i):\n"
        "            pass\n"
    )
    functions = {fn.qualname: fn for fn in functions_of(source)}
    assert set(functions) == {"A.m", "A.__init__", "A.s", "A.s.<locals>.inner"}
    assert body_lines(functions["A.m"].node) == 61
    assert param_count(functions["A.m"]) == 10
    assert param_count(functions["A.s"]) == 8
    assert functions["A.__init__"].is_public and param_count(functions["A.__init__"]) == 9
    assert not functions["A.s.<locals>.inner"].is_public
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    (component,) = strongly_connected(graph)
    assert component == ["a", "b", "c"]
    assert cycle_in(component, graph) == ["a", "b", "c", "a"]
    assert layer_of("backends.merge.api") == 4 and layer_of("train.pe.swag") == 5 and layer_of("") is None


def test_package_ships_its_type_hints():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert (ROOT / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"][PACKAGE]
