"""The package's import graph, read from the source (function-level and type-checking imports
included): no module imports one that imports it back, and each room keeps to its job."""

from __future__ import annotations

import ast
from pathlib import Path

import emo_serve

ROOT = Path(emo_serve.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (package names only where a module itself is named)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def test_no_import_circles() -> None:
    graph = import_graph()
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in trail:
                circles.append(trail[trail.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, [*trail, dep])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert circles == []


def test_each_room_keeps_to_its_job() -> None:
    graph = import_graph()
    store = graph["emo_serve.store"]
    assert not store & {"emo_serve.profiler", "emo_serve.selection", "emo_serve.sizing"}
    imported = {a.name for n in ast.walk(ast.parse((ROOT / "store.py").read_text()))
                if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    assert not imported & {"asyncio", "ThreadPoolExecutor"}  # the store runs no jobs
    assert not {m for m in graph if m.startswith("emo_serve.") and "emo_serve.api" in graph[m]
                and not m.startswith(("emo_serve.api", "emo_serve.cli"))}  # the library never reaches up
    users_of_demo = {m for m, deps in graph.items() if "emo_serve.demo" in deps}
    assert users_of_demo <= {"emo_serve.cli.demo", "emo_serve.default_model", "emo_serve.train.loop"}
    assert "emo_serve.profiler" not in graph["emo_serve.evaluate"]
    assert "emo_serve.profiler" not in graph["emo_serve.api.protocol"]
