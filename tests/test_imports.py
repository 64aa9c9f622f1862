"""The package's import graph has no circle: every import of a `cprec` module, at the top of a file, inside a
function or under TYPE_CHECKING, counts (a circle hidden in a function is still two modules that need each other)."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(folder: str, root: Path = ROOT) -> nx.DiGraph:
    files = {module_name(p, root): p for p in (root / folder).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from cprec.train import run` imports the module cprec.train.run
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            for target in targets:
                if target in files and target != name and not path.name == "__init__.py":
                    graph.add_edge(name, target)
    return graph


def circles(folder: str, root: Path = ROOT) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(import_graph(folder, root)) if len(c) > 1]


def test_no_import_circle_in_cprec():
    assert circles("cprec") == []


def test_the_checker_sees_a_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    assert circles("pkg", tmp_path) == [["pkg.a", "pkg.b"]]
    (package / "b.py").write_text("import os\n")
    assert circles("pkg", tmp_path) == []
