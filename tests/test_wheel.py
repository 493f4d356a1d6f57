"""The wheel built from this repository: one top-level package, `lowbit`, that works installed as it is.

Installed with `pip install --target` (not editable) and run from another folder, it quantizes a tiny
random model and evaluates it; the test venv provides the dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO, save_tiny_model
from tests.test_layers import PYPROJECT

PACKAGE_FOLDERS = sorted(set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()))


def pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                            capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_wheel_holds_lowbit_alone_and_quantizes_and_evaluates_when_installed(tmp_path):
    # from a copy of what the wheel is made of (a build/ folder left in the checkout could add stale files);
    # --no-build-isolation: setuptools from this venv, nothing downloaded
    source = tmp_path / "source"
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source / file)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lowbit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lowbit"}
    for module in ("lowbit/cli.py", "lowbit/quantize/driver.py", "lowbit/calibration/windows.py",
                   "lowbit/evals/evaluate.py", "lowbit/manifest.py"):
        assert module in names

    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    model = save_tiny_model(tmp_path / "tiny", layers=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "eval.txt").write_text("Quantized weights are read back and compared, window by window. " * 40)
    # PYTHONPATH comes before the venv's site-packages, where the editable install of this repo lies
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200", "LOWBIT_DATA_DIR": str(tmp_path / "no-data")}

    def lowbit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import lowbit.quantize.driver as d, lowbit.evals.evaluate as e; "
                            "print(d.__file__); print(e.__file__)"], capture_output=True, text=True, cwd=elsewhere,
                           env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(site / "lowbit") for line in where.stdout.split()), where.stdout

    quantized = lowbit("quantize", str(model), "-o", "out", "--method", "rtn", "--group-size", "32")
    assert quantized.returncode == 0, quantized.stderr
    assert (elsewhere / "out" / "lowbit_manifest.json").is_file()
    evaluated = lowbit("eval", "out", "--base", str(model), "--dataset", "eval.txt", "--seqlen", "64",
                       "--max-windows", "2", "--json", "-")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["kld"]["mean"] >= 0 and report["ppl_quantized"] > 1
    assert json.loads((elsewhere / "out" / "lowbit_manifest.json").read_text())["eval"]["ppl_quantized"] == report["ppl_quantized"]
