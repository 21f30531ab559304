"""The project's pytest configuration keeps the summary line that CI and the GPU runs read."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quiet_run_still_prints_the_summary_line(tmp_path):
    """`pytest -q` (the GPU suite's command) must end with 'N passed': a `-q` in addopts would make it `-qq`,
    which drops the line."""
    (tmp_path / "test_one.py").write_text("def test_ok():\n    assert True\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                          str(tmp_path), "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout.splitlines()[-1], out.stdout


def test_every_subpackage_is_packaged():
    """A non-editable `pip install .` ships only the packages pyproject lists: each folder of sparsify/ with an
    __init__.py must be among them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sparsify").rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
