"""Bundles written for monai-nacl 0.1 keep running: monai_nacl.calibration is the former name of temperature."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_former_calibration_module_warns_and_resolves_to_temperature():
    import monai_nacl
    from monai_nacl import temperature

    sys.modules.pop("monai_nacl.calibration", None)
    with pytest.warns(DeprecationWarning, match="monai_nacl.temperature"):
        old = importlib.import_module("monai_nacl.calibration")
    assert old.TemperatureScaled is temperature.TemperatureScaled
    assert old.warn_if_not_calibrated is temperature.warn_if_not_calibrated
    assert monai_nacl.calibration is old  # `$monai_nacl.calibration.X` in a bundle expression
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        monai_nacl.nope  # noqa: B018


def test_a_0_1_target_still_instantiates():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {"net": {"_target_": "monai_nacl.calibration.TemperatureScaled", "network": "$torch.nn.Identity()"}}
    )
    from monai_nacl.temperature import TemperatureScaled

    assert isinstance(parser.get_parsed_content("net"), TemperatureScaled)
