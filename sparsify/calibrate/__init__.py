"""`sparsify.calibrate`: per-head error measurement, the budget ILP, and recipe emission."""

from .core import DEFAULT_LEVELS, DEFAULT_TILES, CalibrationResult, calibrate, run_calibration

__all__ = ["calibrate", "run_calibration", "CalibrationResult", "DEFAULT_TILES", "DEFAULT_LEVELS"]
