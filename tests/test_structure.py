"""The house rules of the code base, checked on its source: one ``adbench`` namespace, no import
cycle between packages, the front door above everything, no method importing another, short files."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adbench import models

from .conftest import REPO

#: Source folders and the package each is installed as (pyproject.toml, [tool.setuptools.package-dir]).
PACKAGES = {"adbench": "adbench", "models": "adbench.models", "datamodules": "adbench.datamodules",
            "callbacks": "adbench.callbacks", "benchmark": "adbench.benchmark"}
#: The front door: the command line and the Python API (adbench/*.py).
FRONT = "adbench"
MAX_LINES = 600


def _sources() -> dict[str, Path]:
    """Module name -> file, for every Python file of the suite (not the tests)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if folder == "adbench" and len(parts) > 1:
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def _layer(module: str) -> str:
    """adbench.models.stpm -> adbench.models; adbench.cli -> adbench (the front door)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in ("models", "datamodules", "callbacks", "benchmark") \
        else FRONT


def test_nothing_imports_the_old_top_level_names() -> None:
    files = [*_sources().values(), *sorted((REPO / "tests").glob("*.py"))]
    offenders = [f"{path.relative_to(REPO)}: {module}" for path in files
                 for module in _imports("tests.x", path) if module.split(".")[0] in ("models", "datamodules",
                                                                                     "callbacks", "benchmark")]
    assert not offenders, offenders


def test_packages_import_each_other_without_a_cycle_and_nothing_below_imports_the_front_door() -> None:
    sources = _sources()
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        for imported in _imports(name, path):
            if imported.startswith("adbench"):
                graph.setdefault(_layer(name), set()).add(_layer(imported))
    # The front door's own helpers that every layer may use: the checkpoint entry and where the project is.
    shared = {"adbench.checkpoints", "adbench.project"}
    below = ("adbench.models", "adbench.datamodules", "adbench.callbacks")
    for name, path in sources.items():
        if _layer(name) in below:
            bad = {m for m in _imports(name, path) if m.startswith("adbench")
                   and _layer(m) in (FRONT, "adbench.benchmark") and m not in shared
                   and not m.startswith(tuple(f"{s}." for s in shared)) and m != "adbench"}
            assert not bad, f"{name} imports {sorted(bad)}"
        if _layer(name) == FRONT:
            assert not {m for m in _imports(name, path) if m.startswith("adbench.benchmark")}, name
    # No cycle between the packages (each package's own imports are not edges).
    edges = {layer: targets - {layer} for layer, targets in graph.items()}
    visiting, done = set(), set()

    def visit(layer: str, trail: list[str]) -> None:
        assert layer not in visiting, f"import cycle: {' -> '.join([*trail, layer])}"
        if layer in done:
            return
        visiting.add(layer)
        for target in edges.get(layer, ()):
            if layer == FRONT and target in below:
                continue  # the front door uses every layer: its edges down are the point
            visit(target, [*trail, layer])
        visiting.discard(layer)
        done.add(layer)

    for layer in edges:
        visit(layer, [])


def test_no_method_imports_another_methods_file() -> None:
    methods = {models.get_model_class(name).__module__ for name in models.list_models()}
    sources = _sources()
    for method in methods:
        others = {m for m in _imports(method, sources[method]) if m in methods - {method}
                  or any(m.startswith(f"{o}.") for o in methods - {method})}
        assert not others, f"{method} imports {sorted(others)}"


def test_no_source_file_is_over_600_lines() -> None:
    long = {str(path.relative_to(REPO)): n for path in _sources().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.slow
def test_the_wheel_installs_only_the_adbench_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    [wheel] = tmp_path.glob("adbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"adbench", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("adbench/models/stpm.py", "adbench/datamodules/mvtec.py", "adbench/callbacks/evaluation.py",
                   "adbench/benchmark/run.py", "adbench/benchmark/reports/published/mvtec_ad.csv", "adbench/cli.py"):
        assert module in names, module


@pytest.mark.slow
@pytest.mark.parametrize("module", ["adbench.models", "adbench.datamodules", "adbench.benchmark.reports.leaderboard"])
def test_modules_import_from_outside_the_checkout(module: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
