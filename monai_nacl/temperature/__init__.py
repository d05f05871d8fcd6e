"""Post-hoc calibration: temperature scaling as part of the network."""

from monai_nacl.temperature.record import (
    check_calibration_record,
    read_calibration_record,
    record_path,
    save_calibrated,
    warn_if_not_calibrated,
)
from monai_nacl.temperature.scaling import (
    T_MAX,
    T_MIN,
    StaleTemperatureWarning,
    TemperatureFitter,
    TemperatureScaled,
    apply_temperature,
    compose_temperature,
    fit_temperature,
    near_foreground,
    weights_fingerprint,
)

__all__ = [
    "TemperatureScaled",
    "TemperatureFitter",
    "fit_temperature",
    "compose_temperature",
    "near_foreground",
    "apply_temperature",
    "T_MIN",
    "T_MAX",
    "StaleTemperatureWarning",
    "weights_fingerprint",
    "save_calibrated",
    "read_calibration_record",
    "check_calibration_record",
    "record_path",
    "warn_if_not_calibrated",
]
