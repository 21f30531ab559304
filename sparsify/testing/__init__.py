"""Fixtures for tests and benchmarks: planted-geometry heads and tiny DiT families."""
