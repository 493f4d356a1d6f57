"""The house rules, read off the source with ast: one import name, layers that import downward only,
every third-party import declared.

    base         lowbit/{__init__, errors, redact, network, files, manifest}.py: imports nothing of ours above it
    quantize     quantize/     -> lowbit.quantize: base only
    calibration  calibration/  -> lowbit.calibration: base only
    evals        evals/        -> lowbit.evals: base, quantize, calibration
    shell        every other lowbit/*.py (cli, recipe, hub, card, checkpoint_info, ...): anything; nothing imports it

Imports inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

BASE = {"lowbit", "lowbit.errors", "lowbit.redact", "lowbit.network", "lowbit.files", "lowbit.manifest"}
MAY_IMPORT = {
    "base": {"base"},
    "quantize": {"base", "quantize"},
    "calibration": {"base", "calibration"},
    "evals": {"base", "quantize", "calibration", "evals"},
    "shell": {"base", "quantize", "calibration", "evals", "shell"},
}
OLD_NAMES = {"quantize", "calibration", "evals"}  # installed only as lowbit.quantize, ...
# Imported only where a feature needs them, behind an ImportError that says what to install.
OPTIONAL = {"pyarrow"}  # calibration/sources.py require_pyarrow: wikitext2 from the Hub

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """Package name -> its folder in the repository, as pyproject.toml installs them."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    return {package: REPO / folder for package, folder in mapping.items()}


def modules() -> dict[str, Path]:
    """Every module of the library: dotted name -> file."""
    found = {}
    for package, folder in package_folders().items():
        for file in sorted(folder.glob("*.py")):
            found[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return found


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    for layer in ("quantize", "calibration", "evals"):
        if module == f"lowbit.{layer}" or module.startswith(f"lowbit.{layer}."):
            return layer
    return "shell"


def imports(file: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the file; `from a import b` names a.b when that is a module."""
    package = module if file.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .. import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in known else base))
    return found


def layer_violations(files: dict[str, Path]) -> list[str]:
    """One line per import against the rules, naming the file and the line."""
    known = set(files)
    problems = []
    for module, file in files.items():
        for line, name in imports(file, module, known):
            top = name.split(".")[0]
            where = f"{file.relative_to(REPO) if file.is_relative_to(REPO) else file}:{line}"
            if top in OLD_NAMES:
                problems.append(f"{where}: imports {name}; use lowbit.{name}")
            elif top == "lowbit":
                target = name
                while target not in known and "." in target:  # lowbit.errors.UsageError -> lowbit.errors
                    target = target.rpartition(".")[0]
                if layer_of(target) not in MAY_IMPORT[layer_of(module)]:
                    problems.append(f"{where}: {module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return problems


def test_every_module_imports_downward_only():
    assert layer_violations(modules()) == []


def test_the_layers_cover_the_whole_library():
    found = modules()
    assert BASE <= set(found), BASE - set(found)
    layers = {layer_of(m) for m in found}
    assert layers == set(MAY_IMPORT)
    assert {"lowbit.cli", "lowbit.recipe", "lowbit.hub", "lowbit.card", "lowbit.checkpoint_info"} <= {
        m for m in found if layer_of(m) == "shell"}
    assert not (REPO / "lowbit" / "inspect.py").exists()  # would shadow the standard library's inspect


@pytest.mark.parametrize("as_module, source, complaint", [
    ("lowbit.quantize.synthetic", "from lowbit.cli import app\n", "(quantize) imports lowbit.cli (shell)"),
    ("lowbit.quantize.synthetic", "def f():\n    from lowbit.evals import report\n",
     "(quantize) imports lowbit.evals.report (evals)"),
    ("lowbit.calibration.synthetic", "import lowbit.quantize.arch\n", "(calibration) imports lowbit.quantize.arch"),
    ("lowbit.evals.synthetic", "from lowbit import recipe\n", "(evals) imports lowbit.recipe (shell)"),
    ("lowbit.quantize.synthetic", "from ..hub import push_folder\n", "(quantize) imports lowbit.hub (shell)"),
    ("lowbit.quantize.synthetic", "from quantize.arch import LayerNorms\n", "imports quantize.arch; use lowbit."),
])
def test_an_upward_import_is_named_with_its_file(tmp_path, as_module, source, complaint):
    synthetic = tmp_path / "synthetic.py"
    synthetic.write_text(source)
    problems = layer_violations({**modules(), as_module: synthetic})
    assert len(problems) == 1 and problems[0].startswith(f"{synthetic}:") and complaint in problems[0], problems


def test_a_base_module_that_imports_upward_fails(tmp_path):
    synthetic = tmp_path / "manifest.py"
    synthetic.write_text("from lowbit.quantize.writer import write_sharded\n")
    problems = layer_violations({**modules(), "lowbit.manifest": synthetic})
    assert problems == [f"{synthetic}:1: lowbit.manifest (base) imports lowbit.quantize.writer (quantize)"]


def test_no_module_is_over_400_lines():
    long = {str(f.relative_to(REPO)): n for f in modules().values() if (n := len(f.read_text().splitlines())) > 400}
    assert long == {}


def third_party_imports() -> dict[str, str]:
    """Top-level third-party module -> a file importing it, over the whole library."""
    found = {}
    files = modules()
    for module, file in files.items():
        for _, name in imports(file, module, set(files)):
            top = name.split(".")[0]
            if top and top != "lowbit" and top not in sys.stdlib_module_names:
                found.setdefault(top, str(file.relative_to(REPO)))
    return found


def declared(requirements: list[str]) -> set[str]:
    return {normalise(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in requirements}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    dependencies = declared(PYPROJECT["project"]["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, file in sorted(third_party_imports().items()):
        if module in OPTIONAL:
            continue
        owners = {normalise(d) for d in distributions.get(module, [module])}
        if not owners & dependencies:
            missing.append(f"{module} (imported by {file}; distribution {', '.join(sorted(owners))})")
    assert missing == [], "not in pyproject.toml dependencies: " + "; ".join(missing)


def test_requires_python_admits_no_version_without_tomllib():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert any(re.search(r"^import tomllib$", f.read_text(), re.M) for f in modules().values())
