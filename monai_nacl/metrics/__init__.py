"""Calibration metrics."""

from monai_nacl.metrics.calibration import BinStatistics, CalibrationMetric, calibration_errors

__all__ = ["BinStatistics", "CalibrationMetric", "calibration_errors"]
