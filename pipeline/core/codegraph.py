"""The project modules a piece of code runs, read from the source itself.

A stage's cache key covers the source of every ``pipeline`` module it can execute: the
modules of its functions, and, transitively, every project module they import, at module
level or inside a function. Importing ``pipeline.a.b`` also runs the packages ``pipeline``
and ``pipeline.a``: their module-level imports count too (a function-level import in a
package ``__init__`` runs only when that function is called, and a caller of it imports
the package by name, which counts in full). ``pipeline.resources`` counts with every file
it ships (fit data, class names). Nothing is imported: the files are parsed, so this never
loads torch, and it can read a copy of the package elsewhere (``root``).

Libraries are not followed: their versions are part of a key on their own (runner.py).
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable

PROJECT = "pipeline"
ROOT = Path(__file__).resolve().parents[2]      # the folder that holds the package
DATA_PACKAGES = ("pipeline.resources",)          # hashed with every file under them


def module_file(module: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


@lru_cache(maxsize=None)
def _imports(path: Path, module: str, mtime_ns: int) -> tuple[frozenset, frozenset]:
    """(every project module ``module`` imports, those imported at module level)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    every, top = set(), set()
    top_level = {id(n) for n in _run_on_import(tree)}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            # ``from pipeline.x import y``: y may be a submodule or a name in pipeline.x
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found = {n for n in names if n == PROJECT or n.startswith(PROJECT + ".")}
        every |= found
        if id(node) in top_level:
            top |= found
    return frozenset(every), frozenset(top)


def _run_on_import(node: ast.AST):
    """The import statements that run when the module is imported: everywhere but inside a
    function (a class body runs, its methods do not)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _run_on_import(child)


def imports_of(module: str, root: Path = ROOT, module_level_only: bool = False) -> set[str]:
    """The existing project modules ``module`` imports (with the packages above them)."""
    path = module_file(module, root)
    if path is None:
        return set()
    every, top = _imports(path, module, path.stat().st_mtime_ns)
    out = set()
    for name in (top if module_level_only else every):
        if module_file(name, root) is not None:
            out.add(name)
    return out - {module}


def closure(modules: Iterable[str], root: Path = ROOT) -> list[str]:
    """Every project module that running ``modules`` can execute, sorted."""
    seen: set[str] = set()
    full = [m for m in modules if m == PROJECT or m.startswith(PROJECT + ".")]
    parents_only: list[str] = []
    while full or parents_only:
        if full:
            m, module_level_only = full.pop(), False
        else:
            m, module_level_only = parents_only.pop(), True
        key = m if not module_level_only else m + ":top"
        if key in seen or module_file(m, root) is None:
            continue
        seen.add(key)
        full.extend(imports_of(m, root, module_level_only))
        parts = m.split(".")
        parents_only.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted({k.split(":")[0] for k in seen})


def digest(modules: Iterable[str], root: Path = ROOT) -> str:
    """A hash of the source of ``closure(modules)`` (and the files of data packages in it)."""
    h = hashlib.sha256()
    for m in closure(modules, root):
        path = module_file(m, root)
        h.update(m.encode() + b"\0" + path.read_bytes() + b"\0")
        if m in DATA_PACKAGES:
            for f in sorted(path.parent.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    h.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> modules it imports): its strongly connected
    components of more than one module, or a module that imports itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def project_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Every project module and the project modules it imports (any level)."""
    graph = {}
    for path in sorted((root / PROJECT).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        graph[module] = imports_of(module, root)
    return graph
