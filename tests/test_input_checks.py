"""The input checks shared by the public entry points."""

from __future__ import annotations

import numpy as np
import pytest

from monai_nacl.input_checks import check_num_classes
from monai_nacl.losses import FocalLoss, NACLLoss
from monai_nacl.metrics import CalibrationMetric
from monai_nacl.transforms import NeighborPrior


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


def test_check_number_and_check_integer():
    import torch

    from monai_nacl.input_checks import check_integer, check_number

    assert check_number(np.float32(0.5), "a") == 0.5 and check_number(torch.tensor(2), "a") == 2.0
    assert check_integer(np.int16(3), "k") == 3 and check_integer(torch.tensor(3), "k") == 3
    with pytest.raises(ValueError, match=r"a must be a real number \(int or float\), got 'x' \(str\)"):
        check_number("x", "a")
    with pytest.raises(ValueError, match=r"a must be > 0\.0, got 0\.0"):
        check_number(0, "a", minimum=0.0, exclusive_minimum=True)
    # +inf only where an option allows it (an upper bound meaning none); -inf and NaN never
    assert check_number(torch.tensor(float("inf")), "a", minimum=0.0, allow_infinity=True) == float("inf")
    for bad in (float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="a must be finite"):
            check_number(bad, "a", allow_infinity=True)
    with pytest.raises(ValueError, match="a must be finite, got inf"):
        check_number(float("inf"), "a")
    with pytest.raises(ValueError, match=r"k must be an integer, got 3\.0 \(float\)"):
        check_integer(3.0, "k")
    with pytest.raises(ValueError, match=r"k must be an integer, got tensor\(3\.\) \(Tensor\)"):
        check_integer(torch.tensor(3.0), "k")
    # sizes a config may write as floats: whole ones only, and never a bool
    assert (
        check_integer(1e6, "k", whole_floats=True) == 10**6
        and check_integer(np.float64(48.0), "k", whole_floats=True) == 48
    )
    for bad in (48.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="k must be an integer"):
            check_integer(bad, "k", whole_floats=True)
    with pytest.raises(ValueError, match="k must be <= 7, got 8"):
        check_integer(8, "k", maximum=7)


def test_check_number_sequence():
    import torch

    from monai_nacl.input_checks import check_number_sequence

    positive = {"minimum": 0.0, "exclusive_minimum": True}
    for given in ([1, 2.5], (1, 2.5), np.array([1.0, 2.5]), torch.tensor([1.0, 2.5])):
        assert check_number_sequence(given, "s", **positive) == [1.0, 2.5]
    for bad, message in (
        ([], "s must be a non-empty sequence"),
        ("12", "s must be a non-empty sequence"),
        (1.5, "s must be a non-empty sequence"),
        ([1.0, 0.0], r"s\[1\] must be > 0\.0, got 0\.0"),
        ([float("nan")], r"s\[0\] must be finite"),
        ([1, "a"], r"s\[1\] must be a real number"),
    ):
        with pytest.raises(ValueError, match=message):
            check_number_sequence(bad, "s", **positive)


def test_check_label_values_returns_labels_safe_for_ignore_index():
    import torch

    from monai_nacl.input_checks import check_label_values

    lab = torch.tensor([0, 1, 2], dtype=torch.uint8)
    assert check_label_values(lab, 3, None) is lab
    assert check_label_values(lab, 3, -1).dtype == torch.int64  # uint8 cannot hold -1: no wrap-around
    assert check_label_values(lab.bool(), 3, None).dtype == torch.uint8
    with pytest.raises(ValueError, match=r"non-integer values \[0\.5, 2\.25\] \(first at index \(1,\)\)"):
        check_label_values(torch.tensor([1.0, 0.5, 2.25]), 3, None)


@pytest.mark.parametrize("dtype, ok, bad", [("float32", 5e-4, 2e-3), ("float16", 4e-3, 8e-3), ("bfloat16", 0.0, 0.06)])
def test_probability_sum_tolerance_follows_the_dtype(dtype, ok, bad):
    import torch

    from monai_nacl.input_checks import check_probabilities, probability_error

    # channels on dim 0: sums 1 + ok at one voxel, then 1 + bad
    p = torch.stack([torch.tensor([0.5 + ok, 0.5]), torch.tensor([0.5, 0.5])], 1).to(getattr(torch, dtype))
    assert probability_error(p, dim=0) is None
    p = torch.stack([torch.tensor([0.5 + bad, 0.5]), torch.tensor([0.5, 0.5])], 1).to(getattr(torch, dtype))
    with pytest.raises(ValueError, match="channel sums in"):
        check_probabilities(p, dim=0)
