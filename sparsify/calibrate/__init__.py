"""`sparsify.calibrate`: per-head error measurement, the budget ILP, and recipe emission."""

from .config import DEFAULT_LEVELS, DEFAULT_TILES, CalibrationConfig, CalibrationConfigError
from .core import CalibrationResult, calibrate, run_calibration
from .reuse import ReuseCalibration, calibrate_mask_reuse, with_mask_reuse
from .solve import InfeasibleBudgetError

__all__ = ["calibrate", "run_calibration", "CalibrationConfig", "CalibrationConfigError", "CalibrationResult",
           "InfeasibleBudgetError", "DEFAULT_TILES", "DEFAULT_LEVELS", "calibrate_mask_reuse", "with_mask_reuse",
           "ReuseCalibration"]
