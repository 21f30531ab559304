"""`sparsify.calibrate`: per-head error measurement, the budget ILP, and recipe emission."""

from .core import DEFAULT_LEVELS, DEFAULT_TILES, CalibrationResult, calibrate, run_calibration
from .reuse import ReuseCalibration, calibrate_mask_reuse, with_mask_reuse

__all__ = ["calibrate", "run_calibration", "CalibrationResult", "DEFAULT_TILES", "DEFAULT_LEVELS",
           "calibrate_mask_reuse", "with_mask_reuse", "ReuseCalibration"]
