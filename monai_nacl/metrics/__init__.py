"""Calibration metrics."""

from monai_nacl.metrics.calibration import (
    BinStatistics,
    CalibrationMetric,
    calibration_errors,
    equal_mass_bins,
    fine_bin_index,
)
from monai_nacl.metrics.monai_compat import monai_calibration_errors, monai_calibration_output

__all__ = [
    "BinStatistics",
    "CalibrationMetric",
    "calibration_errors",
    "equal_mass_bins",
    "fine_bin_index",
    "monai_calibration_errors",
    "monai_calibration_output",
]
