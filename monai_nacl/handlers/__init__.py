"""Ignite handlers for MONAI workflows and bundles."""

from monai_nacl.handlers.calibration import (
    CalibrationHandler,
    ReliabilityDiagramHandler,
    TemperatureFitHandler,
    atomic_save,
)

__all__ = ["CalibrationHandler", "ReliabilityDiagramHandler", "TemperatureFitHandler", "atomic_save"]
