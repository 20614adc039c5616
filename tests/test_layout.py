"""The seams between the packages, read from the imports in the source (no import is executed).

- no package but bench/ imports bench/ (the benches measure the product; the product never needs
  them; tests may test the benches);
- ingest/ and review/ never import torch (the job and the desk run where no model does);
- handler/ imports neither training/ nor bench/ (the archive carries handler/ alone).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from serving.paths import REPO_ROOT

PACKAGES = sorted(p.parent.name for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name != "tests")


def imported(path: Path) -> set[str]:
    """The top-level names of every module `path` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imports_of(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO_ROOT)): imported(p) for p in sorted((REPO_ROOT / package).rglob("*.py"))}


def offenders(packages, forbidden: str) -> list[str]:
    return [f"{path} imports {forbidden}" for package in packages for path, names in imports_of(package).items()
            if forbidden in names]


def test_the_packages_are_found():
    assert {"bench", "handler", "ingest", "review", "serving", "training"} <= set(PACKAGES)


def test_nothing_outside_bench_imports_bench():
    assert offenders([p for p in PACKAGES if p != "bench"], "bench") == []


@pytest.mark.parametrize("package", ["ingest", "review"])
def test_no_torch_in(package):
    assert offenders([package], "torch") == []


@pytest.mark.parametrize("forbidden", ["training", "bench"])
def test_the_handler_loads_without(forbidden):
    assert offenders(["handler"], forbidden) == []


def test_an_import_inside_a_function_is_seen(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from bench.ceiling import measure\n    import torch.nn as nn\n")
    assert imported(tmp_path / "m.py") == {"bench", "torch"}
