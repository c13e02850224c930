"""The package's layering (docs/architecture.md): no module imports from a layer above its
own, and the programs sent into the sandbox import nothing but the standard library and
each other. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "stigmer_sandbox"
# Lowest first. A module may import from its own layer and those below it.
LAYERS = ("foundation", "images", "runtime", "host", "integrations", "tasks", "entry")
FOLDER_LAYERS = {
    "images": "images",
    "runtime": "runtime",
    "host": "host",
    "integrations": "integrations",
    "tasks": "tasks",
}
# Top-level modules above the foundation: the console script, and the package's face
# (which hands on the runtime's names).
ENTRY_MODULES = {"cli", "warm_run", "__init__", "__main__"}
# Sent into the sandbox as source and run by /usr/bin/python3 -I -S there.
GUEST = PACKAGE / "runtime" / "guest"
GUEST_MODULES = {path.stem for path in GUEST.glob("*.py")} - {"__init__"}
# What host code may import of the guest programs: what both sides share.
GUEST_SHARED = {"stigmer_sandbox.runtime.guest", "stigmer_sandbox.runtime.guest.protocol"}
GUEST_SHARED |= {"stigmer_sandbox.runtime.guest.capture"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or (len(parts) == 1 and parts[0] in ENTRY_MODULES):
        return "entry"
    return FOLDER_LAYERS.get(parts[0], "foundation")


def imported(path: Path) -> set[str]:
    """Every module of the package that `path` imports, anywhere in it."""
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join([*base, *([node.module] if node.module else [])])
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else []
            found.update(names or [target])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stigmer_sandbox"):
            found.add(str(node.module))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stigmer_sandbox"))
    return {name for name in found if module_exists(name)}


def module_exists(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    folder = PACKAGE / relative
    return folder.with_suffix(".py").exists() or (folder / "__init__.py").exists()


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_its_own(path: Path):
    own = LAYERS.index(layer(module_name(path)))
    above = {name for name in imported(path) if LAYERS.index(layer(name)) > own}
    assert not above, f"{module_name(path)} ({LAYERS[own]}) imports {sorted(above)}"


@pytest.mark.parametrize("name", sorted(GUEST_MODULES))
def test_the_programs_sent_into_the_sandbox_need_only_the_standard_library(name: str):
    path = GUEST / f"{name}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in GUEST_MODULES, f"{name} imports .{node.module}"
        elif isinstance(node, ast.ImportFrom):
            assert str(node.module).split(".")[0] in sys.stdlib_module_names, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in sys.stdlib_module_names, alias.name


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if GUEST not in p.parents],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_host_code_imports_only_what_both_sides_share_of_the_guest_programs(path: Path):
    guest = {name for name in imported(path) if name.startswith("stigmer_sandbox.runtime.guest")}
    assert guest <= GUEST_SHARED, f"{module_name(path)} imports {sorted(guest - GUEST_SHARED)}"


# Inside the runtime: the guest programs, then the platform seam, then the host's client
# of a running sandbox, then the lifecycle (every other module of runtime/). A part may
# import from its own part and those before it.
RUNTIME_PARTS = ("guest", "backends", "client", "lifecycle")


def runtime_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["stigmer_sandbox", "runtime"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in RUNTIME_PARTS else "lifecycle"


RUNTIME_SOURCES = [p for p in SOURCES if runtime_part(module_name(p)) not in (None, "guest")]


@pytest.mark.parametrize("path", RUNTIME_SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_runtimes_client_never_reaches_up_into_the_lifecycle(path: Path):
    own = RUNTIME_PARTS.index(str(runtime_part(module_name(path))))
    later = {
        name
        for name in imported(path)
        if runtime_part(name) and RUNTIME_PARTS.index(str(runtime_part(name))) > own
    }
    assert not later, f"{module_name(path)} ({RUNTIME_PARTS[own]}) imports {sorted(later)}"


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported(path) for path in SOURCES}


def test_no_import_circle():
    """No module reaches itself through the imports of others (type-only ones included:
    a circle there still means two modules that cannot be understood apart)."""
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
