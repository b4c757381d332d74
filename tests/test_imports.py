"""The package's shape, kept: no import circles, and no arrow from a leaf up into the folders.

A module's folder names the process that runs it (driver, loop, engines, trainer, serve); the
modules at the top of spin_ray are leaves shared by all. Imports are read from the source (AST),
inside functions too, so nothing is imported to check them.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spin_ray"
# What each folder may import besides itself and the leaves.
MAY_IMPORT = {
    "driver": {"loop", "engines", "trainer", "serve"},
    "loop": {"engines", "trainer", "serve"},
    "serve": {"engines"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("spin_ray", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The spin_ray modules `path` imports (a `from pkg import name` of a module counts as it)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("spin_ray")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spin_ray"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                out.add(name if name in known else node.module)
    return out & known


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def folder(module: str) -> str | None:
    """The process folder of a module, or None for a leaf (and for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_leaves_import_no_folder_and_folders_only_downward():
    wrong = []
    for module, targets in graph().items():
        here = folder(module)
        allowed = {here} | MAY_IMPORT.get(here, set()) if here else set()
        wrong += [f"{module} -> {t}" for t in targets if folder(t) is not None and folder(t) not in allowed]
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_modules_stay_small():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 350}
    assert not long, f"modules over 350 lines: {long}"
