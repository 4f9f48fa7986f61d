"""Static import graph of the project's own modules, read from the source text with :mod:`ast`.

Used by the task cache (:mod:`flows.caching`: a stage's code fingerprint is the hash of its
import closure, so editing any file the stage uses invalidates the cache) and by tests that
check ``dvc.yaml`` deps and import cycles. Nothing is imported or executed.

Rules:

- every ``import``/``from`` statement counts, also inside functions (a lazy import still runs
  the module when the stage does), except those under ``if TYPE_CHECKING:``;
- only modules of the given packages (default ``pipeline``) are nodes; ``from a.b import c``
  reaches ``a.b`` and, when ``c`` is a module, ``a.b.c``; a package is its ``__init__.py``;
  relative imports are resolved;
- a module's closure also holds the ``__init__`` of every package above it (Python runs them
  before the module);
- with ``strings=True`` a string constant naming a module (``"pkg.mod"`` or ``"pkg.mod:func"``,
  as in the model catalogue's lazily imported builders) counts as an import of it.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path = PROJECT_ROOT, packages: Iterable[str] = ("pipeline",)) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of ``packages`` under ``root``."""
    mods: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((Path(root) / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a known module (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool, strings: bool) -> list[tuple[str, bool]]:
    """``(dotted name, exact)`` pairs ``node`` refers to; ``exact``: only that very module counts."""
    if isinstance(node, ast.Import):
        return [(alias.name, False) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [(base, False)] + [(f"{base}.{alias.name}", False) for alias in node.names]
    if strings and isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
        return [(node.value.partition(":")[0], True)]
    return []


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _running_nodes(tree: ast.AST, eager: bool) -> Iterator[ast.AST]:
    """The nodes of ``tree`` that can run: not the body of ``if TYPE_CHECKING:``; with ``eager``,
    only what runs when the module is imported (no function bodies)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        elif eager and node is not tree and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        else:
            todo += ast.iter_child_nodes(node)


def _scan(module: str, mods: dict[str, Path], tree: ast.AST, strings: bool,
          eager: bool) -> tuple[frozenset[str], frozenset[str]]:
    """(known modules, top-level names of other packages) that the running nodes of ``tree`` import."""
    known: set[str] = set()
    external: set[str] = set()
    is_package = mods[module].name == "__init__.py"
    tops = {m.partition(".")[0] for m in mods}
    for node in _running_nodes(tree, eager):
        for target, exact in _targets(node, module, is_package, strings):
            resolved = (target if target in mods else None) if exact else _resolve(target, mods)
            if resolved and resolved != module and not module.startswith(resolved + "."):
                known.add(resolved)
            elif not resolved and not exact and target.partition(".")[0] not in tops:
                if not (isinstance(node, ast.ImportFrom) and node.level):
                    external.add(target.partition(".")[0])
    return frozenset(known), frozenset(external)


_SCANNED: dict[tuple, tuple[frozenset[str], frozenset[str]]] = {}  # parsing is the slow part


def _scan_module(module: str, mods: dict[str, Path], strings: bool, eager: bool) -> tuple[frozenset[str], ...]:
    path = mods[module]
    source = path.read_bytes()
    key = (module, str(path), tuple(sorted(mods)), strings, eager, hashlib.sha256(source).digest())
    if key not in _SCANNED:
        _SCANNED[key] = _scan(module, mods, ast.parse(source, str(path)), strings, eager)
    return _SCANNED[key]


def imports_of(module: str, mods: dict[str, Path], *, strings: bool = False, eager: bool = False) -> set[str]:
    """The known modules ``module`` imports (not itself, not the packages above it).

    ``eager``: only those imported when the module is (not inside functions).
    """
    return set(_scan_module(module, mods, strings, eager)[0])


def external_imports(module: str, mods: dict[str, Path], *, eager: bool = False) -> set[str]:
    """Top-level names of the other packages ``module`` imports (``prefect``, ``numpy``, ``os``...)."""
    return set(_scan_module(module, mods, False, eager)[1])


def function_imports(module: str, function: str, root: Path = PROJECT_ROOT,
                     packages: Iterable[str] = ("pipeline",)) -> set[str]:
    """The known modules imported inside the body of ``function`` (any def of that name) in ``module``."""
    mods = module_files(root, packages)
    found: set[str] = set()
    defs = [node for node in ast.walk(_parse(mods[module]))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function]
    if not defs:
        raise ValueError(f"{module} has no function {function!r}")
    for node in defs:
        found |= _scan(module, mods, node, False, False)[0]
    return found


def import_graph(root: Path = PROJECT_ROOT, packages: Iterable[str] = ("pipeline",), *,
                 strings: bool = False, eager: bool = False) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over ``packages`` (see the module docstring for the rules)."""
    mods = module_files(root, packages)
    return {m: imports_of(m, mods, strings=strings, eager=eager) for m in mods}


def _ancestors(module: str, mods: dict[str, Path]) -> list[str]:
    parts = module.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in mods]


def closure(entries: Iterable[str], root: Path = PROJECT_ROOT, packages: Iterable[str] = ("pipeline",),
            *, strings: bool = True) -> set[str]:
    """Every module that importing ``entries`` (dotted names) can run: transitive imports plus package inits."""
    mods = module_files(root, packages)
    seen: set[str] = set()
    todo = []
    for entry in entries:
        resolved = _resolve(entry, mods)
        if resolved is None:
            raise ValueError(f"{entry!r} is not a module of {sorted(set(packages))} under {root}")
        todo.append(resolved)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += _ancestors(module, mods)
        todo += imports_of(module, mods, strings=strings)
    return seen


def closure_files(entries: Iterable[str], root: Path = PROJECT_ROOT,
                  packages: Iterable[str] = ("pipeline",)) -> list[Path]:
    """The source files of :func:`closure`, sorted, relative to ``root``."""
    mods = module_files(root, packages)
    return sorted(mods[m].relative_to(root) for m in closure(entries, root, packages))


def fingerprint(entries: Iterable[str], root: Path = PROJECT_ROOT) -> str:
    """sha256 (16 hex digits) over the path and bytes of every file in the ``pipeline`` closure of ``entries``."""
    digest = hashlib.sha256()
    for rel in closure_files(entries, root):
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update((Path(root) / rel).read_bytes())
    return digest.hexdigest()[:16]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path ``[a, b, ..., a]`` per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):  # iterative Tarjan (no recursion limit)
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_cycle_path(graph, set(component)) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path that ends where it starts."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return sorted(component)
