"""rayft's packages import in one direction only: training imports no other rayft package; tuning and
serving import only training; cluster (the CLI, the job file, Ray Jobs) may import everything. Read from
the source with ast, so an import inside a function counts as much as one at the top of a file. Within and across
packages no modules import each other round a cycle, and no import is relative."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

ALLOWED = {
    "training": set(),
    "tuning": {"training"},
    "serving": {"training"},
    "cluster": {"training", "tuning", "serving"},
}


def imported_packages(path) -> list[tuple[int, str]]:
    """(line, rayft subpackage) for every import of rayft.<package> in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "rayft" else [f"rayft.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rayft" and len(parts) > 1 and parts[1] in ALLOWED:
                found.append((node.lineno, parts[1]))
    return found


def test_imports_point_down_only():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if target != package and target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports rayft.{target}")
    assert wrong == [], "imports against the layering (training < tuning, serving < cluster):\n" + "\n".join(wrong)


def test_the_walk_sees_every_kind_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import rayft.cluster.cli\nfrom rayft.tuning import sweep\nfrom rayft import serving\n"
        "def f():\n    from rayft.training.data import x\n"
    )
    assert sorted(t for _, t in imported_packages(probe)) == ["cluster", "serving", "training", "tuning"]


# ------------------------------------------------------------------------------------ import cycles, relative imports


def modules(root: Path) -> dict[str, Path]:
    """rayft's modules (dotted names) and their files: the top-level ones and every package's, at any depth."""
    found = {}
    paths = [*root.glob("*.py"), *(p for package in ALLOWED for p in sorted((root / package).rglob("*.py")))]
    for path in paths:
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("rayft", *parts))] = path
    return found


def imported_modules(path: Path, known) -> set[str]:
    """The modules among `known` that a file imports, wherever the import stands (in a function too):
    `from rayft.training import storage` is rayft.training.storage, `from rayft.training.data import x` is
    rayft.training.data."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        found.update(name for name in names if name in known)
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Each set of rayft modules that import one another, round a cycle (Tarjan's strongly connected components
    of the module graph), sorted; a module importing itself counts too."""
    files = modules(root)
    graph = {name: imported_modules(path, files) for name, path in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def relative_imports(path: Path) -> list[int]:
    """The lines of a file's relative imports (`from . import x`, `from .x import y`)."""
    return [
        n.lineno for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.ImportFrom) and n.level
    ]


def test_no_module_imports_itself_round_a_cycle():
    """A cycle works only while every import in it but one waits inside a function: it breaks when one moves to
    the top of its file. The piece both sides need belongs in a module below them."""
    assert import_cycles(ROOT) == [], "rayft modules that import each other (move what they share down)"


def test_no_relative_imports():
    """Every import names its module in full (rayft.training.x), so each says which room it comes from."""
    wrong = [f"{path.relative_to(ROOT)}:{line}" for path in modules(ROOT).values() for line in relative_imports(path)]
    assert wrong == [], "relative imports (write `from rayft.<package>.<module> import ...`):\n" + "\n".join(wrong)


def test_the_checks_see_a_cycle_and_a_relative_import(tmp_path):
    for package in ALLOWED:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "training" / "a.py").write_text("from rayft.training.b import x\n")
    (tmp_path / "training" / "b.py").write_text("import rayft.training.c\n")
    (tmp_path / "training" / "c.py").write_text("def f():\n    from rayft.training import a\n")  # a -> b -> c -> a
    (tmp_path / "serving" / "d.py").write_text("from rayft.training import c\nfrom . import e\n")
    (tmp_path / "serving" / "e.py").write_text("def f():\n    from .d import g\n")
    (tmp_path / "cluster" / "f.py").write_text("import rayft.cluster.f\n")  # itself
    assert import_cycles(tmp_path) == [
        ["rayft.cluster.f"],
        ["rayft.training.a", "rayft.training.b", "rayft.training.c"],
    ]
    assert relative_imports(tmp_path / "serving" / "d.py") == [2]
    assert relative_imports(tmp_path / "serving" / "e.py") == [2]
