"""Every test under tests/gpu is a GPU test: it carries the `gpu` marker (skipped without CUDA by tests/conftest.py)."""

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before tests/conftest.py skips `gpu` items when there is no CUDA
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
