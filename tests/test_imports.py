"""Imports point one way: no cycle among the project's modules (import statements at module level, where a
cycle breaks an import; imports inside functions are deferred on purpose and may point anywhere but torch's
way, which test_no_torch guards)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"glm_export": ROOT / "glm_export", "glm_runtime": ROOT / "runtime", "glmx_benchmarks": ROOT / "benchmarks"}


def module_graph() -> dict[str, set[str]]:
    modules = {f"{pkg}.{path.stem}": path for pkg, folder in PACKAGES.items() for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle_among_the_projects_modules():
    graph = module_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2
    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 30  # the walk saw the whole tree


def test_the_runtime_imports_only_the_runtime():
    for name, deps in module_graph().items():
        if name.startswith("glm_runtime."):
            assert all(d.startswith("glm_runtime.") for d in deps), (name, deps)


def test_the_benchmarks_install_under_their_own_name():
    """setup.py installs benchmarks/ as glmx_benchmarks (no top-level `benchmarks` in site-packages), and no
    module of the project imports it by its folder's name."""
    import ast as _ast
    setup = _ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in _ast.walk(setup) if isinstance(n, _ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: _ast.literal_eval(k.value) for k in call.keywords if k.arg in ("packages", "package_dir")}
    assert "benchmarks" not in kw["packages"] and kw["package_dir"]["glmx_benchmarks"] == "benchmarks"
    stale = []
    for folder in (ROOT / "glm_export", ROOT / "runtime", ROOT / "benchmarks", ROOT / "tests"):
        for path in folder.rglob("*.py"):
            for node in _ast.walk(_ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, _ast.Import) else \
                    [node.module or ""] if isinstance(node, _ast.ImportFrom) else []
                stale += [f"{path.name}: {n}" for n in names if n == "benchmarks" or n.startswith("benchmarks.")]
    assert not stale, stale
