"""The examples in the public docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["sparsify.recipe", "sparsify.geometry", "sparsify.runtime", "sparsify.methods.select", "sparsify.methods.vsa",
           "sparsify.kernels.reference", "sparsify.calibrate.measure", "sparsify.adapters.base",
           "sparsify.kernels.rope", "sparsify.kernels.tile_select", "sparsify.kernels.gather", "sparsify.factorized",
           "sparsify.adapters.infer", "sparsify.calibrate.trajectory", "sparsify.calibrate.schedule"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
