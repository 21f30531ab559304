"""`sparsify.calibrate`: per-head error measurement, the budget ILP, and recipe emission."""

from .config import DEFAULT_LEVELS, DEFAULT_TILES, CalibrationConfig, CalibrationConfigError
from .core import CalibrationResult, calibrate, run_calibration
from .reuse import ReuseCalibration, calibrate_mask_reuse, with_mask_reuse
from .schedule import ScheduleCalibration, calibrate_schedule, with_schedule
from .solve import InfeasibleBudgetError
from .allocate import InfeasibleTimeBudgetError
from .generation import PlanCalibration, calibrate_plan
from .latency import LatencyTable, load_latency_table, measure_latency_table
from .pipeline import calibrate_pipeline

__all__ = ["calibrate", "run_calibration", "CalibrationConfig", "CalibrationConfigError", "CalibrationResult",
           "InfeasibleBudgetError", "DEFAULT_TILES", "DEFAULT_LEVELS", "calibrate_mask_reuse", "with_mask_reuse",
           "ReuseCalibration", "calibrate_schedule", "with_schedule", "ScheduleCalibration",
           "InfeasibleTimeBudgetError", "PlanCalibration", "calibrate_plan", "LatencyTable",
           "load_latency_table", "measure_latency_table", "calibrate_pipeline"]
