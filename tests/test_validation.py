"""The input checks shared by the public entry points."""

from __future__ import annotations

import numpy as np
import pytest

from monai_nacl.losses import FocalLoss, NACLLoss
from monai_nacl.metrics import CalibrationMetric
from monai_nacl.transforms import NeighborPrior
from monai_nacl.validation import check_num_classes


@pytest.mark.parametrize("value", [3, 3.0, np.int64(3)])
def test_check_num_classes_accepts_whole_numbers(value):
    assert check_num_classes(value) == 3 and type(check_num_classes(value)) is int


@pytest.mark.parametrize("value", [1, 0, -2, 2.5, True, "3", None, [3]])
def test_check_num_classes_names_the_bad_value(value):
    with pytest.raises(
        ValueError, match=r"num_classes must be an integer >= 2, got " + repr(value).replace("[", r"\[")
    ):
        check_num_classes(value)


@pytest.mark.parametrize("entry", [NACLLoss, FocalLoss, CalibrationMetric, NeighborPrior])
def test_every_entry_point_rejects_a_bad_class_count(entry):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 'three'"):
        entry(num_classes="three")
