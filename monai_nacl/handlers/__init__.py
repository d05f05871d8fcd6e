"""Ignite handlers for MONAI workflows and bundles."""

from monai_nacl.handlers.adaptive_penalty import ClassAdaptivePenalty, update_multipliers
from monai_nacl.handlers.alpha import AlphaSchedule
from monai_nacl.handlers.calibration import (
    CalibrationHandler,
    ReliabilityDiagramHandler,
    TemperatureFitHandler,
    atomic_save,
)
from monai_nacl.handlers.checkpoint import ResumableCheckpoint, latest_checkpoint
from monai_nacl.handlers.conformal import ConformalFitHandler
from monai_nacl.handlers.model_saver import CalibratedModelSaver
from monai_nacl.handlers.prior_from_batch import PriorFromBatch
from monai_nacl.handlers.validation import IntervalValidationHandler

__all__ = [
    "AlphaSchedule",
    "ClassAdaptivePenalty",
    "ConformalFitHandler",
    "update_multipliers",
    "ResumableCheckpoint",
    "latest_checkpoint",
    "CalibratedModelSaver",
    "IntervalValidationHandler",
    "PriorFromBatch",
    "CalibrationHandler",
    "ReliabilityDiagramHandler",
    "TemperatureFitHandler",
    "atomic_save",
]
