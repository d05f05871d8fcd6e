"""Losses: NACL and the calibration baselines it is compared with.

Bundle configs should name these by dotted path (``monai_nacl.losses.NACLLoss``): a bare ``NACLLoss``
or ``DiceCELoss`` is ambiguous with MONAI's own classes.
"""

from monai_nacl.losses.ace import HardL1ACELoss, SoftL1ACELoss, binned_calibration
from monai_nacl.losses.baselines import (
    CrossEntropyLoss,
    DiceCELoss,
    ECPLoss,
    FocalLoss,
    LabelSmoothingLoss,
    MbLSLoss,
    SVLSLoss,
)
from monai_nacl.losses.deep_supervision import DeepSupervisionLoss
from monai_nacl.losses.nacl import NACLLoss, check_penalty_weight

__all__ = [
    "NACLLoss",
    "check_penalty_weight",
    "DeepSupervisionLoss",
    "CrossEntropyLoss",
    "DiceCELoss",
    "ECPLoss",
    "FocalLoss",
    "LabelSmoothingLoss",
    "MbLSLoss",
    "SVLSLoss",
    "HardL1ACELoss",
    "SoftL1ACELoss",
    "binned_calibration",
]
