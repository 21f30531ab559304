"""The project's pytest configuration keeps the summary line that CI and the GPU runs read."""

import os
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


LEAKING_TESTS = '''
import pytest
import torch.nn.functional as F

from sparsify import runtime, sparsify, unsparsify
from sparsify.passes.install import sparsify_sdpa
from sparsify.testing import dits

RECIPE = {"version": 1, "defaults": {"method": "vsa", "tile": [2, 4, 8], "budget": {"density": 0.5}}}


def _sparse():
    m = dits.named_sdpa_dit()
    return sparsify(m, RECIPE, example_inputs=dits.dit_inputs(), grid=(4, 4, 8))


@pytest.fixture(scope="module")
def shared():
    m = _sparse()
    yield m
    unsparsify(m)


def test_a_uses_the_module_fixture(shared):
    assert runtime.STATE.sites


def test_b_leaks():
    _sparse()


def test_c_uses_the_module_fixture_again(shared):
    assert F.scaled_dot_product_attention is sparsify_sdpa


def test_d_after_the_module_fixture_still_runs(shared):
    assert len(runtime.STATE.sites) == 2  # the fixture's two self sites; the leaked ones were dropped
'''


def test_a_test_leaving_a_model_sparsified_fails_at_teardown_and_later_tests_run_clean(tmp_path):
    """The conftest's leak check names the leaking test, resets the state, and lets module-scoped fixtures keep
    their model sparsified across the module's tests."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_leak.py").write_text(LEAKING_TESTS)
    (tmp_path / "test_next.py").write_text(
        "import torch, torch.nn.functional as F\nfrom sparsify import runtime\n\n"
        "def test_clean():\n    assert not runtime.STATE.sites and F.scaled_dot_product_attention is "
        "torch._C._nn.scaled_dot_product_attention\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                          str(tmp_path), "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "5 passed, 1 error" in out.stdout.splitlines()[-1], out.stdout + out.stderr
    assert "ERROR at teardown of test_b_leaks" in out.stdout
    assert "test_leak.py::test_b_leaks left sparsify's global state behind: 2 installed sites" in out.stdout
