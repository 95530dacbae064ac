"""quick_lab's import graph, read with ``ast`` (nothing is imported): layers point down, no cycles, no
imports of modules (or names) that do not exist.

Layers, top to bottom: cli (5) -> report (4) -> model (3) -> lab (2) -> core (1) -> build (0). A module
may import from its own layer or below. The top-level ``quick_lab/__init__.py`` counts as core (1), so
it may import only core and build. Every intra-package import counts, absolute (``quick_lab.x.y``) or
relative, at module level or inside a function, and ``importlib.import_module("quick_lab....")`` with a
literal name: a function-level import that points up or closes a cycle is the same coupling, only
deferred. The sources are read from the repository (found from this file), so the check runs the same
against a checkout and an installed copy.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = "quick_lab"
LAYERS = {"build": 0, "core": 1, "lab": 2, "model": 3, "report": 4, "cli": 5}
TOP_LAYER = 1  # quick_lab/__init__.py


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # file:line
    deferred: bool  # inside a function

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}  ({self.where}{', in a function' if self.deferred else ''})"


@dataclass
class Report:
    edges: list[Edge] = field(default_factory=list)
    upward: list[str] = field(default_factory=list)
    cycles: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts == [ROOT]:
        return TOP_LAYER
    return LAYERS.get(parts[1]) if parts[0] == ROOT and len(parts) > 1 else None


def module_name(relpath: str) -> tuple[str, bool]:
    """``quick_lab/core/ops.py`` -> (``quick_lab.core.ops``, False); ``__init__.py`` -> (package, True)."""
    parts = relpath[:-3].split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds at import time (None: it defines ``__getattr__``, anything goes)."""
    names: set[str] = set()

    def targets(node):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                targets(elt)
        elif isinstance(node, ast.Starred):
            targets(node.value)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, (ast.For, ast.AsyncFor)):
                targets(node.target)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
            elif isinstance(node, ast.Import):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.update(a.asname or a.name for a in node.names)
            for attr in ("body", "orelse", "finalbody"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, attr, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                visit(handler.body)
            for case in getattr(node, "cases", []) or []:
                visit(case.body)

    visit(tree.body)
    return None if "__getattr__" in names else names


def _inside_functions(tree: ast.AST) -> set[int]:
    """ids of import nodes that sit inside a function body."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in ast.walk(node):
                if sub is not node:
                    inside.add(id(sub))
    return inside


def analyse(files: dict[str, str]) -> Report:
    """The import graph of ``files`` ({"quick_lab/core/ops.py": source, ...}) and what is wrong with it."""
    modules: dict[str, tuple[str, bool, ast.Module]] = {}
    for relpath, source in sorted(files.items()):
        name, is_pkg = module_name(relpath)
        modules[name] = (relpath, is_pkg, ast.parse(source, filename=relpath))
    # Implicit namespace packages: every directory above a module is importable.
    packages = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    exists = set(modules) | packages
    defined = {name: _top_level_names(tree) for name, (_, _, tree) in modules.items()}
    report = Report()

    for src, (relpath, is_pkg, tree) in modules.items():
        deferred = _inside_functions(tree)
        package = src if is_pkg else src.rpartition(".")[0]

        def add(dst: str, node: ast.AST) -> None:
            where = f"{relpath}:{node.lineno}"
            if dst not in exists:
                report.missing.append(f"{src} imports missing module {dst}  ({where})")
                return
            report.edges.append(Edge(src, dst, where, id(node) in deferred))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                        add(alias.name, node)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    if node.level - 1 >= len(base):
                        report.missing.append(f"{src}: relative import beyond the top ({relpath}:{node.lineno})")
                        continue
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not (target == ROOT or target.startswith(ROOT + ".")):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in exists:
                        add(sub, node)
                    elif target not in modules:
                        # no such module, or a namespace package (no __init__.py) without that submodule
                        add(target if target not in exists else sub, node)
                    else:
                        add(target, node)
                        names = defined[target]
                        if alias.name != "*" and names is not None and alias.name not in names:
                            report.missing.append(f"{src} imports missing name {target}.{alias.name} (neither a "
                                                  f"submodule nor defined there)  ({relpath}:{node.lineno})")
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str) and node.args[0].value.startswith(ROOT)
                  and (getattr(node.func, "attr", None) == "import_module"
                       or getattr(node.func, "id", None) == "import_module")):
                add(node.args[0].value, node)

    # (a) layers point down
    for edge in report.edges:
        ls, ld = layer(edge.src), layer(edge.dst)
        if ls is None or ld is None:
            unknown = edge.src if ls is None else edge.dst
            report.upward.append(f"{edge}: {unknown} is in no layer ({', '.join(LAYERS)})")
        elif ld > ls:
            report.upward.append(f"{edge}: layer {ls} imports layer {ld}")

    # (b) cycles: strongly connected components of the module graph (Tarjan, iterative)
    graph: dict[str, set[str]] = {m: set() for m in exists}
    for edge in report.edges:
        graph[edge.src].add(edge.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1 or node in graph[node]:
                        sccs.append(sorted(comp))
    for comp in sorted(sccs):
        members = set(comp)
        inside = [str(e) for e in report.edges if e.src in members and e.dst in members]
        report.cycles.append(f"cycle among {', '.join(comp)}:\n      " + "\n      ".join(inside))
    return report


def package_sources(root: Path = REPO / ROOT) -> dict[str, str]:
    return {p.relative_to(root.parent).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def report() -> Report:
    files = package_sources()
    assert files, f"no modules under {REPO / ROOT}"
    return analyse(files)


def _fail(title: str, lines: list[str]) -> None:
    message = f"{len(lines)} {title}:\n  " + "\n  ".join(lines)
    pytest.fail(message, pytrace=False)


def test_the_graph_is_not_empty(report):
    assert len(report.edges) > 20, "the parser found almost no intra-package imports"


def test_layers_point_down(report):
    if report.upward:
        _fail("import(s) against the layer order cli > report > model > lab > core > build", report.upward)


def test_no_import_cycles(report):
    if report.cycles:
        _fail("import cycle(s) (module-level and function-level imports alike)", report.cycles)


def test_no_imports_of_missing_modules(report):
    if report.missing:
        _fail("import(s) of modules or names that do not exist", report.missing)


# ---------------------------------------------------------------- the checker itself


SYNTHETIC = {
    "quick_lab/__init__.py": "from quick_lab.core.a import thing\nfrom . import lab\n",
    "quick_lab/build/__init__.py": "",
    "quick_lab/build/x.py": "import os\n\ndef f():\n    from quick_lab.lab import y\n    return y\n",
    "quick_lab/core/__init__.py": "",
    "quick_lab/core/a.py": "from quick_lab.core import b\nthing = 1\n",
    "quick_lab/core/b.py": "def g():\n    from .a import thing\n    return thing\n",
    "quick_lab/core/c.py": "from quick_lab.core.gone import h\nfrom quick_lab.core.a import nothing_here\n",
    "quick_lab/lab/__init__.py": "",
    "quick_lab/lab/y.py": "from ..build import x\nfrom ..core.a import thing\n",
    "quick_lab/cli.py": "import importlib\nm = importlib.import_module('quick_lab.report.fig')\n",
    "quick_lab/report/other.py": "",  # report/ is a namespace package (no __init__.py)
    "quick_lab/model/s.py": "from quick_lab.report import gone2\n",
}


def test_checker_reports_a_synthetic_bad_graph():
    r = analyse(SYNTHETIC)
    text = "\n".join(r.upward + r.cycles + r.missing)
    print(text)
    # upward: build (0) -> lab (2) inside a function; the top-level package (1) -> lab (2), relatively
    assert any(u.startswith("quick_lab.build.x -> quick_lab.lab.y") and "in a function" in u for u in r.upward)
    assert any(u.startswith("quick_lab -> quick_lab.lab ") for u in r.upward)
    assert len(r.upward) == 2, r.upward
    # cycles: core.a <-> core.b (b's side deferred and relative); build.x <-> lab.y
    assert len(r.cycles) == 2, r.cycles
    assert any("quick_lab.core.a, quick_lab.core.b" in c and "quick_lab.core.b -> quick_lab.core.a" in c
               for c in r.cycles)
    assert any("quick_lab.build.x, quick_lab.lab.y" in c for c in r.cycles)
    # missing: a module, a name, a module named to importlib, a submodule of a namespace package
    assert any("missing module quick_lab.core.gone" in m and "core/c.py:1" in m for m in r.missing)
    assert any("missing name quick_lab.core.a.nothing_here" in m for m in r.missing)
    assert any("missing module quick_lab.report.fig" in m for m in r.missing)
    assert any("missing module quick_lab.report.gone2" in m and "model/s.py:1" in m for m in r.missing)
    assert len(r.missing) == 4, r.missing


def test_checker_accepts_a_clean_graph():
    clean = {
        "quick_lab/__init__.py": "from quick_lab.core.a import thing\n",
        "quick_lab/build/__init__.py": "",
        "quick_lab/build/x.py": "X = 1\n",
        "quick_lab/core/__init__.py": "",
        "quick_lab/core/a.py": "from quick_lab.build import x\nfrom . import b\nthing = x.X\n",
        "quick_lab/core/b.py": "try:\n    import numpy\nexcept ImportError:\n    numpy = None\n",
        "quick_lab/cli.py": "from quick_lab import thing\n\ndef main():\n    from quick_lab.core.a import thing\n",
    }
    r = analyse(clean)
    assert (r.upward, r.cycles, r.missing) == ([], [], [])
    assert {(e.src, e.dst) for e in r.edges} == {
        ("quick_lab", "quick_lab.core.a"), ("quick_lab.core.a", "quick_lab.build.x"),
        ("quick_lab.core.a", "quick_lab.core.b"), ("quick_lab.cli", "quick_lab"), ("quick_lab.cli", "quick_lab.core.a")}
