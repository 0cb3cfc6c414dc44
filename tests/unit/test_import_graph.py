"""The packages' modules import each other without a cycle.

The graph is read from the source with `ast`, not by importing it: every `import` and
`from ... import` between modules of `sidecar`, `filters` and `opus_client` is an edge,
at module level or inside a function (a lazy import that only hides a cycle still counts),
except under `if TYPE_CHECKING:`, which never runs. Importing `a.b.c` from outside `a.b`
runs `a/b/__init__.py` first, so that is an edge too. Imports by name at run time
(`importlib.import_module`, the filter registry's) are not in the graph.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("sidecar", "filters", "opus_client")
EXCLUDED: tuple[str, ...] = ()  # every module is in the graph (filters/wasm included)


def _excluded(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in EXCLUDED)


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            if not _excluded(name):
                modules[name] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, skipping `if TYPE_CHECKING:` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports_in(child)
            continue
        yield from _imports_in(node)


def _imports_in(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The modules an import statement names (a `from pkg import sub` names `pkg.sub`)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        if not is_package:
            anchor = anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    yield base
    for alias in node.names:
        yield f"{base}.{alias.name}"


def _packages_entered(module: str, targets: set[str], files: dict[str, Path]) -> set[str]:
    """The packages whose `__init__` an import runs first: `sidecar.chain` importing
    `sidecar.config.schema` runs `sidecar.config`. A module's own packages are left out,
    as they are already being imported when it runs."""
    entered: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for n in range(1, len(parts)):
            package = ".".join(parts[:n])
            if package in files and not module.startswith(package + "."):
                entered.add(package)
    return entered


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(tree):
            names = list(_targets(node, module, is_package))
            # `from pkg import sub` depends on pkg.sub; `from mod import name` on mod.
            submodules = [name for name in names[1:] if name in files]
            if isinstance(node, ast.ImportFrom) and submodules:
                edges.update(submodules)
            else:
                edges.update(name for name in names if name in files)
        edges.update(_packages_entered(module, edges, files))
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `a -> b -> ... -> a`, or None (depth-first, three colours)."""
    done: set[str] = set()
    on_path: list[str] = []
    on_path_set: set[str] = set()

    def visit(module: str) -> list[str] | None:
        on_path.append(module)
        on_path_set.add(module)
        for target in sorted(graph.get(module, ())):
            if target in on_path_set:
                return [*on_path[on_path.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        on_path.pop()
        on_path_set.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def test_the_graph_sees_the_packages() -> None:
    graph = import_graph()
    assert "sidecar.proxy" in graph and "filters.retry" in graph and "opus_client.aio" in graph
    assert "sidecar.chain" in graph["sidecar.proxy"]
    assert "sidecar.discovery" in graph["sidecar.server"]  # entered for discovery.factory
    assert "opus_client" not in graph["opus_client.aio"]  # its own package
    assert not any(_excluded(module) for module in graph)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_the_protocol_package_is_sans_io() -> None:
    """sidecar.proto is bytes in, events and bytes out: importing every module of it loads
    no event loop (the asyncio adapters live in sidecar.adapters and sidecar.upstream)."""
    names = sorted(
        f"sidecar.proto.{path.stem}"
        for path in (REPO / "sidecar" / "proto").glob("*.py")
        if path.stem != "__init__"
    )
    assert "sidecar.proto.h2engine" in names and "sidecar.proto.h1head" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('asyncio.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
