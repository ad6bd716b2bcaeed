"""The import graph issue 10 promised: the core imports no plugin; plugins reach the core only through
``peft_kernel.plugin_api`` and the public top level; no plugin imports a *method* plugin (family
libraries such as ``peft_kernel_lycoris`` are shared on purpose); and the core has no import cycle
apart from ``if TYPE_CHECKING:`` imports (a function-level import counts: it is a cycle all the same).

Read from the source with ``ast``, so it holds for code paths no test happens to execute."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "peft_kernel"
PLUGIN_SOURCES = sorted(p for p in (ROOT / "plugins").glob("*/src/*") if p.is_dir() and not p.name.startswith(("_", ".")))


def _modules(package_dir: Path) -> dict[str, Path]:
    out = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module ``module`` imports outside ``if TYPE_CHECKING:`` blocks, with its line (``from a
    import b`` yields ``a`` and ``a.b``, since ``b`` may be a submodule)."""
    found: list[tuple[str, int]] = []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit_stmt(stmt)
                continue
            visit_stmt(child)

    def visit_stmt(stmt: ast.AST) -> None:
        if isinstance(stmt, ast.Import):
            found.extend((alias.name, stmt.lineno) for alias in stmt.names)
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                base = ".".join(package[: len(package) - stmt.level + 1] + ([stmt.module] if stmt.module else []))
            found.append((base, stmt.lineno))
            found.extend((f"{base}.{alias.name}", stmt.lineno) for alias in stmt.names)
        visit(stmt)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _method_plugins() -> set[str]:
    """Packages that register a method (as opposed to family libraries, backends and commands)."""
    return {src.name for src in PLUGIN_SOURCES if any("def peft_kernel_register_methods" in p.read_text() for p in src.rglob("*.py"))}


def test_the_core_imports_no_plugin():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _modules(CORE).items() for name, line in _imports(path, module)
                 if name.split(".")[0].startswith("peft_kernel_")]
    assert offenders == []


@pytest.mark.parametrize("src", PLUGIN_SOURCES, ids=lambda p: p.name)
def test_plugins_reach_the_core_only_through_plugin_api(src):
    offenders = []
    for module, path in _modules(src).items():
        for name, line in _imports(path, module):
            parts = name.split(".")
            if parts[0] == "peft_kernel" and len(parts) > 1 and parts[1] != "plugin_api":
                # `from peft_kernel import get_peft_model` is the public top level; a submodule is not
                if (CORE / parts[1]).is_dir() or (CORE / f"{parts[1]}.py").exists():
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert offenders == []


@pytest.mark.parametrize("src", PLUGIN_SOURCES, ids=lambda p: p.name)
def test_no_plugin_imports_another_method_plugin(src):
    methods = _method_plugins() - {src.name}
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for module, path in _modules(src).items() for name, line in _imports(path, module)
                 if name.split(".")[0] in methods]
    assert offenders == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_core_has_no_import_cycle_except_annotation_only_ones():
    modules = _modules(CORE)
    graph = {m: {name for name, _ in _imports(path, m) if name in modules and name != m and name != "peft_kernel"}
             for m, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
