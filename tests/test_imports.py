"""Imports point one way: no cycle among the project's modules, counting every import statement at any depth
(module level, and the imports deferred inside functions: a deferred import still makes two modules depend on
each other), and the runtime never imports glm_export (test_no_torch also runs it with torch blocked)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"glm_export": ROOT / "glm_export", "glm_runtime": ROOT / "runtime", "glmx_benchmarks": ROOT / "benchmarks"}


@functools.cache
def _parsed(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def parsed(path: Path) -> ast.Module:
    """A file's syntax tree, parsed once per version of the file (the tests below walk the same tree)."""
    return _parsed(path, path.stat().st_mtime_ns)


def module_graph(root: Path = ROOT, depth: str = "any") -> dict[str, set[str]]:
    """module -> the project's modules it imports; depth "any" reads every import statement, "module" only the
    module-level ones."""
    folders = {pkg: root / folder.relative_to(ROOT) for pkg, folder in PACKAGES.items()}
    modules = {f"{pkg}.{path.stem}": path for pkg, folder in folders.items() for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        tree = parsed(path)
        for node in ast.walk(tree) if depth == "any" else tree.body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle of a depth-first walk (module names, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise _Cycle(stack[stack.index(dep) :] + [dep])
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    try:
        for node in sorted(graph):
            if node not in state:
                visit(node)
    except _Cycle as found:
        return found.args[0]
    return None


class _Cycle(Exception):
    pass


def test_no_import_cycle_at_any_depth():
    graph = module_graph()
    assert len(graph) > 30  # the walk saw the whole tree
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """A cycle made only by an import inside a function is found; at module level alone it would not be."""
    for folder in PACKAGES.values():
        (tmp_path / folder.relative_to(ROOT)).mkdir(parents=True)
    runtime = tmp_path / "runtime"
    (runtime / "a.py").write_text("from glm_runtime import b\n")
    (runtime / "b.py").write_text("def f():\n    from glm_runtime.a import g\n")
    assert find_cycle(module_graph(tmp_path, depth="module")) is None
    assert find_cycle(module_graph(tmp_path)) == ["glm_runtime.a", "glm_runtime.b", "glm_runtime.a"]


def test_the_runtime_imports_only_the_runtime():
    """At any depth: a glm_runtime module imports no glm_export or glmx_benchmarks module (the torch backend is
    reached by its string name through importlib, session.TORCH_REFERENCE)."""
    for name, deps in module_graph().items():
        if name.startswith("glm_runtime."):
            assert all(d.startswith("glm_runtime.") for d in deps), (name, deps)


def test_the_benchmarks_install_under_their_own_name():
    """pyproject.toml installs benchmarks/ as glmx_benchmarks (no top-level `benchmarks` in site-packages), and no
    module of the project imports it by its folder's name."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "benchmarks" not in setuptools["packages"] and setuptools["package-dir"]["glmx_benchmarks"] == "benchmarks"
    stale = []
    for folder in (ROOT / "glm_export", ROOT / "runtime", ROOT / "benchmarks", ROOT / "tests"):
        for path in folder.rglob("*.py"):
            for node in ast.walk(parsed(path)):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                stale += [f"{path.name}: {n}" for n in names if n == "benchmarks" or n.startswith("benchmarks.")]
    assert not stale, stale


def test_no_module_imports_another_modules_underscore_names():
    """A module's underscore names are its own: across the project's modules no `from X import _name`
    (tests may reach into a module they test)."""
    modules = set(module_graph())
    found = []
    for pkg, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            for node in ast.walk(parsed(path)):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module
                    and (node.module in modules or node.module in PACKAGES)
                ):
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    found += [f"{pkg}.{path.stem}: from {node.module} import {name}" for name in private]
    assert not found, found
