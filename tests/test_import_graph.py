"""The house goes one way: core <- runtimes <- front doors, and no module imports itself back through others.

Walks every import statement of the project's packages with `ast` (function-level imports included; nothing is
imported, so no side effects), then checks the floors drawn in docs/DESIGN.md ("Floors"):

- core: `sqllava_edge.*` except the front doors (config, model, conversation, image, tokenizer, bundle, generation and
  the helpers they share) imports neither `runtimes` nor a front door;
- runtimes: `runtimes.*` imports no front door;
- front doors: the package's `__init__` (it re-exports `Assistant`), `sqllava_edge.assistant`, `sqllava_edge.cli`,
  `sqllava_edge.serve.*`;
- core and runtimes import nothing from `training`, `export` or `benchmarks`;
- no module imports a command line (`<package>.__main__`): a command line parses arguments and calls library code;
- no import cycle between the project's modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sqllava_edge", "runtimes", "export", "training", "benchmarks")
FRONT_DOORS = ("sqllava_edge", "sqllava_edge.assistant", "sqllava_edge.cli", "sqllava_edge.cli_watch",
               "sqllava_edge.serve")
CORE, RUNTIMES, FRONT = 1, 2, 3


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (resolved to the longest known module name)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def floor(name: str) -> int | None:
    if any(name == door or name.startswith(door + ".") for door in FRONT_DOORS[1:]) or name == FRONT_DOORS[0]:
        return FRONT
    if name.split(".")[0] == "runtimes":
        return RUNTIMES
    if name.split(".")[0] == "sqllava_edge":
        return CORE
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_floors_point_one_way():
    upward = []
    for source, targets in graph().items():
        for target in targets:
            low, high = floor(source), floor(target)
            if low is not None and high is not None and high > low:
                upward.append(f"{source} -> {target}")
            if low in (CORE, RUNTIMES) and target.split(".")[0] in ("training", "export", "benchmarks"):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports that go up a floor (docs/DESIGN.md, 'Floors'):\n" + "\n".join(sorted(upward))


def test_nothing_imports_a_command_line():
    """`python -m export.gguf` and friends are leaves: what they run lives in library modules (export/pipeline.py)."""
    edges = graph()
    into_main = sorted(f"{s} -> {t}" for s, targets in edges.items() for t in targets if t.endswith(".__main__"))
    assert not into_main, "modules that import a command line:\n" + "\n".join(into_main)
    assert {"export.__main__", "export.gguf.__main__"} <= set(edges)  # the walk sees the command lines


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_walk_sees_known_edges():
    """The checker is not vacuous: edges that exist today are found, and a made-up upward edge would be flagged."""
    edges = graph()
    assert "sqllava_edge.config" in edges["runtimes.engine"]
    assert "runtimes.engine" in edges["sqllava_edge.assistant"]
    assert floor("sqllava_edge.serve.app") == FRONT and floor("runtimes.engine") == RUNTIMES
    assert floor("sqllava_edge.generation") == CORE and floor("sqllava_edge") == FRONT
