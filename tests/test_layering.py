"""The floors of docs/ARCHITECTURE.md ("Floors"), checked from the code's own imports: every intra-package import,
at module level or inside a function, read with `ast` (nothing is imported). A room may import only rooms on a
lower floor; no two files may import each other, directly or around a loop; an import inside a function is a
front end's business, or one of a few in the core that each say why in a comment."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "internvl_engine"

# floor of each top-level room (a file or a subpackage of internvl_engine); a room imports only lower floors
FLOORS = {
    "errors": 0, "constants": 0, "_version": 0,
    "outputs": 1, "progress": 1, "sampling": 1,
    "ops": 2, "parallel": 2, "config": 2, "kernels": 1,
    "processor": 3, "layers": 3,
    "quant": 4, "settings": 4, "structured": 4,
    "models": 5,
    "loader": 6,
    "worker": 7,
    "engine": 8,
    "llm": 9,
    "server": 10, "bench": 10,
    "cli": 11,
    "__main__": 12, "__init__": 12,
}
FRONT_ENDS = {"cli", "bench", "server", "__main__", "__init__"}
MAX_CORE_FUNCTION_IMPORTS = 5


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    """(importer, imported module, inside a function, line, has a comment) for every intra-package import. A
    `from pkg import name` names the submodule when one exists, else the package (its face, `__init__.py`). The
    faces a submodule import runs on the way are not listed: a room's face is in the room, and the file-cycle
    check adds them."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = []
    for module, path in files.items():
        text = path.read_text()
        lines = text.splitlines()
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

        def commented(node) -> bool:
            here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
            return "#" in here or above.strip().startswith("#")

        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                        source = ".".join(base + ([child.module] if child.module else []))
                    else:
                        source = child.module or ""
                    if source.split(".")[0] == "internvl_engine":
                        for alias in child.names:
                            name = f"{source}.{alias.name}"
                            targets.append(name if name in files or name.startswith("internvl_engine.kernels.")
                                           else source)
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names if a.name.split(".")[0] == "internvl_engine"]
                for target in targets:
                    if target != module:
                        found.append((module, target, inside, child.lineno, commented(child)))
                visit(child, inside)

        visit(ast.parse(text), False)
    return files, found


def test_every_room_has_a_floor():
    files, _ = _imports()
    rooms = {_room(m) for m in files}
    assert rooms <= FLOORS.keys(), f"rooms without a floor in FLOORS (docs/ARCHITECTURE.md): {rooms - FLOORS.keys()}"


def test_no_import_climbs_a_floor():
    _, found = _imports()
    bad = sorted({f"{a} -> {b} (line {line})" for a, b, _, line, _ in found
                  if _room(a) != _room(b) and FLOORS[_room(a)] <= FLOORS[_room(b)]})
    assert not bad, "imports that climb or cross a floor:\n" + "\n".join(bad)


def test_no_file_import_cycle():
    """Importing a submodule first runs the faces (`__init__.py`) of the packages above it, so each face on the way
    counts as imported too, except the importer's own packages (already running when it runs)."""
    files, found = _imports()
    graph = defaultdict(set)
    for a, b, *_ in found:
        parts = b.split(".")
        for i in range(2, len(parts) + 1):
            on_the_way = ".".join(parts[:i])
            if on_the_way in files and on_the_way != a and not a.startswith(on_the_way + "."):
                graph[a].add(on_the_way)
    cycles, state, stack = [], {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(files):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_room_import_cycle():
    _, found = _imports()
    graph = defaultdict(set)
    for a, b, *_ in found:
        if _room(a) != _room(b):
            graph[_room(a)].add(_room(b))

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert not [r for r in list(graph) if reaches(r, r)], dict(graph)


def test_function_level_imports_are_few_and_explained():
    _, found = _imports()
    core = sorted({(a, line, why) for a, b, inside, line, why in found if inside and _room(a) not in FRONT_ENDS})
    assert len(core) <= MAX_CORE_FUNCTION_IMPORTS, \
        f"{len(core)} imports inside functions outside the front ends (at most {MAX_CORE_FUNCTION_IMPORTS}):\n" + \
        "\n".join(f"{a} line {line}" for a, line, _ in core)
    silent = [f"{a} line {line}" for a, line, why in core if not why]
    assert not silent, "function-level imports without a comment saying why:\n" + "\n".join(silent)


def test_the_checker_sees_what_it_checks():
    """The walk itself: it finds module- and function-level imports, relative and absolute, and package faces."""
    files, found = _imports()
    edges = {(a, b) for a, b, *_ in found}
    assert "internvl_engine.engine.llm_engine" in files
    assert ("internvl_engine.llm", "internvl_engine.engine.llm_engine") in edges
    assert ("internvl_engine.engine.llm_engine", "internvl_engine.engine.scheduler") in edges
    assert any(inside for a, b, inside, *_ in found if _room(a) == "cli")
