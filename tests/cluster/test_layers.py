"""rayft's packages import in one direction only: training imports no other rayft package; tuning and
serving import only training; cluster (the CLI, the job file, Ray Jobs) may import everything. Read from
the source with ast, so an import inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast

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
