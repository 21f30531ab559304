"""Bundled recipes (package data), found by bare file name: `sparsify(model, recipe="wan14b.yaml")`."""
