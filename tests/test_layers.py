"""The package layout: one `tokenprune` namespace, one-way layers, every module importable alone."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# Lowest first. A module may import from lower layers and from its own sub-package; siblings in
# one layer are independent of each other.
LAYERS = [
    ("tokenprune.checks", "tokenprune.config", "tokenprune.checkpoints", "tokenprune.throughput"),
    ("tokenprune.engine",),
    ("tokenprune.pruners",),
    ("tokenprune.backbones", "tokenprune.data"),
    ("tokenprune.modules",),
    ("tokenprune.search",),
    ("tokenprune.apps",),
    ("hydra_plugins.tokenprune_launcher",),
]


def unit(module: str) -> tuple[int, str]:
    """(layer index, layer member) of a tokenprune module; the bare package root is below everything."""
    if module == "tokenprune":
        return -1, module
    for index, members in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + "."):
                return index, member
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py; add it to LAYERS")


def package_modules() -> dict[str, Path]:
    """Every Python module of the distribution, by its `tokenprune.*` name."""
    modules = {}
    for package, folder in FOLDERS.items():
        if package == "tokenprune.conf":
            continue
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if not any(name.startswith(other + ".") or name == other for other in FOLDERS if len(other) > len(package)):
                modules[name] = path
    return modules


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


MODULES = package_modules()


def test_distribution_installs_only_the_tokenprune_namespace():
    top_level = {name for name, dists in importlib.metadata.packages_distributions().items() if "tokenprune" in dists}
    assert top_level == {"tokenprune", "hydra_plugins"}  # hydra_plugins: where Hydra looks for launchers
    assert set(MODULES) >= {"tokenprune.engine.encoder", "tokenprune.search.evolution", "tokenprune.apps.train"}


def test_no_module_uses_the_folder_names_as_packages():
    for name, path in MODULES.items():
        for imported in imports_of(path):
            assert imported.split(".")[0] not in FOLDERS.values(), f"{name} imports {imported}"


def test_dependencies_run_one_way():
    violations = []
    for name, path in MODULES.items():
        source_layer, source_member = unit(name)
        for imported in imports_of(path):
            if not imported.startswith("tokenprune."):
                continue
            target_layer, target_member = unit(imported)
            if target_member != source_member and target_layer >= source_layer:
                violations.append(f"{name} -> {imported}")
    assert not violations, "imports against the layers (README Architecture): " + "; ".join(violations)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    def attempt(module: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd="/")
        return module, done.returncode, done.stderr[-600:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [result for result in pool.map(attempt, sorted(MODULES)) if result[1] != 0]
    assert not failures, failures


@pytest.mark.parametrize("config", ["train", "search", "bench"])
def test_configs_ship_inside_the_package(config):
    from importlib.resources import files

    assert (files("tokenprune.conf") / f"{config}.yaml").is_file()
