"""filters/wasm's import structure: a lazy package face and no cycle among its modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import filters.wasm

PACKAGE = Path(filters.wasm.__file__).parent


def test_importing_the_abi_module_does_not_load_wasmtime() -> None:
    probe = "import sys, filters.wasm.abi; print('wasmtime' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_the_registry_target_still_resolves() -> None:
    from filters.wasm.filter import factory

    assert filters.wasm.factory is factory


def _imports(path: Path) -> set[str]:
    """The sibling modules `path` imports, counting imports under TYPE_CHECKING and
    inside functions too: a cycle that only type checking closes is still one."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("filters.wasm."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("filters.wasm."):
                    found.add(alias.name.split(".")[2])
    return found


def test_no_import_cycle_inside_filters_wasm() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    graph = {name: _imports(PACKAGE / f"{name}.py") & modules for name in modules}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(modules):
        visit(name, [])
