"""Split-conformal prediction on calibrated segmentation probabilities, and its record beside a model's weights.

``monai_nacl.conformal.methods`` holds the methods (prediction sets, risk-controlled masks, volume intervals);
``monai_nacl.conformal.record`` writes and checks ``model.conformal.json`` (docs/conformal.md).
"""

from monai_nacl.conformal.methods import (
    ConformalPredictionSets,
    ConformalRiskControl,
    ConformalVolumeIntervals,
    case_conformal_quantile,
    conformal_quantile,
    conformal_quantile_index,
    crc_threshold_index,
)
from monai_nacl.conformal.record import (
    CONFORMAL_KINDS,
    StaleConformalWarning,
    check_conformal_record,
    conformal_record_path,
    load_conformal,
    read_conformal_record,
    save_conformal,
    warn_if_conformal_stale,
)

__all__ = [
    "conformal_quantile_index",
    "conformal_quantile",
    "case_conformal_quantile",
    "crc_threshold_index",
    "ConformalPredictionSets",
    "ConformalRiskControl",
    "ConformalVolumeIntervals",
    "CONFORMAL_KINDS",
    "StaleConformalWarning",
    "conformal_record_path",
    "save_conformal",
    "read_conformal_record",
    "load_conformal",
    "check_conformal_record",
    "warn_if_conformal_stale",
]
