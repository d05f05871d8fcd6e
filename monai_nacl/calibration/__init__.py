"""Post-hoc calibration: temperature scaling as part of the network."""

from monai_nacl.calibration.temperature import (
    T_MAX,
    T_MIN,
    TemperatureFitter,
    TemperatureScaled,
    apply_temperature,
    compose_temperature,
    fit_temperature,
    near_foreground,
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
]
