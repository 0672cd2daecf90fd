"""The package layout: one `tokenprune` namespace, one-way layers, every module importable alone."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# Lowest first. A module may import from lower layers and from its own sub-package; siblings in
# one layer are independent of each other.
LAYERS = [
    ("tokenprune.allocator",),
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


# Imports the third-party modules once, then forks one child per project module, which imports it
# with no other project module loaded: the same check as a fresh interpreter per module (a cycle or
# a missing import among our modules fails), without paying for torch and transformers each time.
FORKING_IMPORTER = """
import importlib, json, os, sys, traceback
third_party, ours = json.loads(sys.argv[1])
for name in third_party:
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # optional dependency: the child's own import decides
assert not [name for name in sys.modules if name.startswith(("tokenprune", "hydra_plugins.tokenprune"))]
failures = []
for module in ours:
    child = os.fork()
    if child == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) != 0:
        failures.append(module)
print(json.dumps(failures))
"""


def test_every_module_imports_alone():
    ours = sorted(MODULES)
    imported = {name for path in MODULES.values() for name in imports_of(path)}
    third_party = sorted(name for name in imported if not name.startswith(("tokenprune", "hydra_plugins.tokenprune")))
    done = subprocess.run(
        [sys.executable, "-c", FORKING_IMPORTER, json.dumps([third_party, ours])],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, f"{failures} fail to import alone: {done.stderr[-3000:]}"
    assert len(ours) > 40


@pytest.mark.parametrize("config", ["train", "search", "bench"])
def test_configs_ship_inside_the_package(config):
    from importlib.resources import files

    assert (files("tokenprune.conf") / f"{config}.yaml").is_file()
