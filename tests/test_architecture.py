"""The import graph of the library core (converters/, quant/, runtime/), read from the source with `ast`.

Rules:
- The core never imports the face package r1v/ (CLI, apps, micro, bench, testing, ...): the only name it
  takes from `r1v` itself is `__version__`.
- converters/ is the bottom layer: it imports neither runtime/ nor quant/.
- No import cycles between files, except the ones listed in ALLOWED_CYCLES (each with the reason it is still
  there); the list can only shrink: a listed cycle that is gone fails the test until its entry is removed.

Which imports count: every `import` / `from ... import` statement in the file, at module level, under
`if TYPE_CHECKING:` and inside functions alike. A function-level (lazy) import still makes one file depend on
the other; deferring it only changes when the dependency is loaded, so it does not break a cycle. Not counted:
the implicit import of a module's parent packages (`r1v.runtime` before `r1v.runtime.api`), which every
submodule has. `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.
"""
from __future__ import annotations

import ast
import tomllib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("r1v.converters", "r1v.quant", "r1v.runtime")
ALLOWED_FROM_R1V = {"__version__"}

# Cycles left for later, as the set of modules in each (a strongly connected component of the graph); each
# entry says why it is still there. The test fails when one disappears, so the list can only shrink.
ALLOWED_CYCLES: set[frozenset[str]] = set()


def _package_folders() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: ROOT / folder for pkg, folder in config["package-dir"].items()}


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of every package folder (r1v/ included)."""
    found: dict[str, Path] = {}
    for pkg, folder in _package_folders().items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([pkg, *parts])] = file
    return found


def _imports(name: str, file: Path) -> list[tuple[str, set[str], int]]:
    """(imported module, names taken from it, line) for every import statement of `file`."""
    is_package = file.name == "__init__.py"
    out: list[tuple[str, set[str], int]] = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, set(), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, module] if module else base)
            out.append((module, {alias.name for alias in node.names}, node.lineno))
    return out


def _edges(module: str, names: set[str]) -> set[str]:
    """The project modules an import of `names` from `module` depends on."""
    known = modules()
    if not names:  # import a.b.c: the longest prefix that is a project module
        parts = module.split(".")
        return next(({".".join(parts[:k])} for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in known), set())
    targets = {f"{module}.{n}" if f"{module}.{n}" in known else module for n in names}
    return targets & set(known)


@lru_cache(maxsize=1)
def core_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, file in modules().items():
        if name.startswith(CORE):
            deps: set[str] = set()
            for module, names, _ in _imports(name, file):
                deps |= _edges(module, names)
            graph[name] = {d for d in deps if d.startswith(CORE)} - {name}  # the face is another test's
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child] & graph.keys()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_the_parser_sees_every_core_file_and_lazy_imports():
    graph = core_graph()
    assert {"r1v.converters.gguf_mmproj", "r1v.quant.driver", "r1v.runtime.api",
            "r1v.runtime.backends.llamacpp.backend"} <= graph.keys()
    assert len(graph) == sum(1 for d in ("converters", "quant", "runtime") for _ in (ROOT / d).rglob("*.py"))
    assert "r1v.runtime.backends.llamacpp.backend" in graph["r1v.runtime.api"]  # imported inside load()
    assert "r1v.runtime.options" in graph["r1v.runtime.backends.llamacpp.backend"]


def test_cycle_finder_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == {frozenset("abc")}


def test_the_core_does_not_import_the_face_package():
    offenders = []
    for name, file in modules().items():
        if not name.startswith(CORE):
            continue
        for module, names, line in _imports(name, file):
            rel = file.relative_to(ROOT)
            if module == "r1v":
                if not names or not names <= ALLOWED_FROM_R1V:
                    offenders.append(f"{rel}:{line}: from r1v import {sorted(names)}")
            elif module.startswith("r1v.") and not module.startswith(CORE):
                offenders.append(f"{rel}:{line}: {module}")
    assert offenders == []


def test_converters_import_neither_runtime_nor_quant():
    graph = core_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("r1v.converters")
                    for d in deps if not d.startswith("r1v.converters"))
    assert upward == []


def test_no_import_cycles_between_files_but_the_listed_ones():
    found = cycles(core_graph())
    new = [sorted(c) for c in found - ALLOWED_CYCLES]
    gone = [sorted(c) for c in ALLOWED_CYCLES - found]
    assert new == [], f"import cycles between files: {new}"
    assert gone == [], f"these allowed cycles are gone (or changed): remove them from ALLOWED_CYCLES: {gone}"


def test_the_demo_model_registers_from_r1v_micro():
    import r1v.micro
    from r1v.runtime.files.resolve import LOCAL_MODELS

    assert LOCAL_MODELS["micro-r1v"] is r1v.micro.demo_files


# The rooms of the core (ARCHITECTURE.md), most specific prefix first; a module belongs to the first that matches.
ROOMS = ("r1v.runtime.backends.llamacpp", "r1v.runtime.backends.awq", "r1v.runtime.backends", "r1v.runtime.files",
         "r1v.runtime.model", "r1v.runtime.image", "r1v.runtime", "r1v.quant", "r1v.converters")
# Which rooms each room may import (besides itself): the layering ARCHITECTURE.md states, lowest first.
ROOM_DEPENDS = {
    "r1v.converters": set(),
    "r1v.runtime.image": {"r1v.converters"},
    "r1v.runtime.model": {"r1v.converters"},
    "r1v.quant": {"r1v.converters", "r1v.runtime.image", "r1v.runtime.model"},
    "r1v.runtime.files": {"r1v.converters", "r1v.runtime"},  # runtime: options.py (errors) only
    "r1v.runtime.backends": {"r1v.converters", "r1v.runtime.image", "r1v.runtime"},
    "r1v.runtime.backends.llamacpp": {"r1v.converters", "r1v.runtime.image", "r1v.runtime", "r1v.runtime.backends"},
    "r1v.runtime.backends.awq": {"r1v.converters", "r1v.runtime.image", "r1v.runtime", "r1v.runtime.backends",
                                 "r1v.runtime.files", "r1v.runtime.model", "r1v.quant"},
    "r1v.runtime": {"r1v.converters", "r1v.runtime.image", "r1v.runtime.files", "r1v.runtime.backends",
                    "r1v.runtime.backends.llamacpp", "r1v.runtime.backends.awq"},
}


def room(module: str) -> str:
    return next(r for r in ROOMS if module == r or module.startswith(r + "."))


def test_rooms_import_only_the_rooms_below_them():
    """The layering of ARCHITECTURE.md, so the room graph has no cycle (runtime <-> quant at package level is
    runtime.model <- quant <- runtime.backends.awq, a chain, not a loop)."""
    offenders = sorted(f"{m} -> {d}" for m, deps in core_graph().items() for d in deps
                       if room(d) != room(m) and room(d) not in ROOM_DEPENDS[room(m)])
    assert offenders == []
    # "r1v.runtime" below files/backends means the shared leaves only (options, chat templates), never api.py
    upward = sorted(f"{m} -> {d}" for m, deps in core_graph().items() for d in deps
                    if room(m) != "r1v.runtime" and d == "r1v.runtime.api")
    assert upward == []
