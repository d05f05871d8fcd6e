"""Ignite handlers for MONAI workflows and bundles."""

from monai_nacl.handlers.calibration import (
    CalibrationHandler,
    ReliabilityDiagramHandler,
    TemperatureFitHandler,
    atomic_save,
)
from monai_nacl.handlers.checkpoint import ResumableCheckpoint, latest_checkpoint
from monai_nacl.handlers.prior import PriorFromBatch

__all__ = [
    "ResumableCheckpoint",
    "latest_checkpoint",
    "PriorFromBatch",
    "CalibrationHandler",
    "ReliabilityDiagramHandler",
    "TemperatureFitHandler",
    "atomic_save",
]
