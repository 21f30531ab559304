"""Benchmarks users run: kernel, op, e2e, quality, training; one command per RESULTS.md table in README.md."""
