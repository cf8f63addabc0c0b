"""The package layout's promise, read from the import graph of the source itself.

Data flows one way: contracts -> scenarios -> engine -> server -> testing / cli. A stage imports only the
stages before it (and the shared base modules), and no module imports itself back through others. Imports
under ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside functions do, since they
run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "virtsvc"

BASE = {"virtsvc.errors", "virtsvc.config", "virtsvc._text", "virtsvc._lazy", "virtsvc._logs"}
# What each stage may import besides the base modules and itself.
ALLOWED = {
    "contracts": set(),
    "admin": set(),  # the admin API's contract and client: generated stubs only
    "upstream": {"contracts"},  # the forwarding client; the engine knows only its protocol
    "scenarios": {"contracts"},
    "engine": {"contracts", "scenarios"},
    "observe": {"contracts", "scenarios", "engine", "admin"},  # reads the journal and the call events
    "server": {"contracts", "scenarios", "engine", "admin", "observe", "upstream"},
    "record": {"contracts", "scenarios", "engine", "admin", "upstream", "server", "observe"},
    "verify": {"contracts", "scenarios", "upstream"},  # a client of the real service: replays and judges
    "testing": {"contracts", "scenarios", "engine", "server", "admin", "observe"},
    "migrate": {"contracts", "scenarios"},  # other tools' stubs -> scenario files
    "cli": {
        "contracts",
        "scenarios",
        "engine",
        "server",
        "admin",
        "observe",
        "upstream",
        "record",
        "verify",
        "migrate",
    },
}


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {
    _module_name(p): p
    for p in ROOT.rglob("*.py")
    if "v1" not in p.relative_to(ROOT).parts  # generated stubs
}


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _ours(module: str | None) -> bool:
    return module is not None and module.startswith("virtsvc")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and _ours(child.module):
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add(full if full in MODULES else str(child.module))
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("virtsvc"))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {_resolve(n) for n in found} - {""}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "virtsvc"


def test_the_graph_is_read_from_the_real_source() -> None:
    # Guards the test itself: a parser that found nothing would pass everything below.
    assert "virtsvc.engine.pipeline" in MODULES
    assert "virtsvc.engine.router" in GRAPH["virtsvc.engine.pipeline"]
    assert "virtsvc.server.virtual_server" in GRAPH["virtsvc.server.assembly"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _stage(m) in ALLOWED))
def test_a_stage_imports_only_the_stages_before_it(module: str) -> None:
    stage = _stage(module)
    allowed = ALLOWED[stage] | {stage}
    wrong = sorted(target for target in GRAPH[module] if target not in BASE and _stage(target) not in allowed)
    assert not wrong, f"{module} ({stage}) imports {wrong}; {stage} may import only {sorted(allowed)}"


def test_the_base_modules_import_only_each_other() -> None:
    for module in BASE & MODULES.keys():
        assert GRAPH[module] <= BASE, f"{module} imports {sorted(GRAPH[module] - BASE)}"


def test_no_import_circle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target in GRAPH and not state.get(target):
                walk(target, path)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if not state.get(module):
            walk(module, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
