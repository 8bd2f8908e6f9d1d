"""The packages' layers go one way and nothing imports in a circle (imports read with `ast`, nothing is imported).

    common  <-  billing  <-  deployments  <-  cluster
    common  <-  training <-  cluster

Every import counts, also one inside a function or under TYPE_CHECKING: a lazy import is still a
dependency.  The Ray-free logic behind the Serve wrappers (and billing's decisions) imports no Ray.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from common.runtime import REPO_ROOT

PACKAGES = ("common", "billing", "deployments", "training", "cluster")
ALLOWED = {
    "common": set(),
    "billing": {"common"},
    "training": {"common"},
    "deployments": {"common", "billing"},
    "cluster": {"common", "billing", "deployments", "training"},
}
RAY_FREE = ("deployments.core", "deployments.openai", "billing.admin", "billing.client", "billing.invoice", "billing.keys", "billing.ledger",
            "billing.pricing", "billing.quota", "billing.records", "billing.reports", "billing.service", "billing.witness", "common.config", "common.errors",
            "common.model_store", "common.runtime", "common.envs")  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules (and third-party top-level names) that `name` imports."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` depends on the module itself
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_packages_import_only_the_layers_below():
    wrong = sorted(
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if _top(dep) in PACKAGES and _top(dep) != _top(module) and _top(dep) not in ALLOWED[_top(module)]
    )
    assert not wrong, "imports against the layers (common <- billing <- deployments <- cluster; common <- training <- cluster):\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules():
    assert not _cycles(_graph()), f"import circles: {_cycles(_graph())}"


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for module, deps in _graph().items():
        packages[_top(module)].update(_top(d) for d in deps if _top(d) in PACKAGES and _top(d) != _top(module))
    assert not _cycles(dict(packages)), f"package circles: {_cycles(dict(packages))}"


def test_the_cycle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_logic_behind_the_serve_wrappers_imports_no_ray():
    leaking = sorted(f"{m} imports {d}" for m, deps in _graph().items() if m.startswith(RAY_FREE) for d in deps if _top(d) == "ray")
    assert not leaking, "\n".join(leaking)
