from __future__ import annotations

import pytest
import torch
from conftest import reference_prior

from monai_nacl.neighbor_prior import dense_kernel, ensure_kernel_size, kernel_size_from_spacing, neighbor_prior


def test_single_voxel_hand_computed():
    lab = torch.zeros(1, 1, 3, 3, 3)
    lab[0, 0, 1, 1, 1] = 1
    tau = neighbor_prior(lab, 2)
    # every voxel of a 3x3x3 volume has the centre in its window exactly once
    assert torch.allclose(tau[0, 1], torch.full((3, 3, 3), 1 / 27))
    assert torch.allclose(tau.sum(1), torch.ones(1, 3, 3, 3))


def test_zeros_padding_border_sums_match_monai_behaviour():
    lab = torch.zeros(1, 1, 5, 5, 5)
    tau = neighbor_prior(lab, 2, padding="zeros").sum(1)[0]
    assert tau[0, 0, 0].item() == pytest.approx(8 / 27)  # corner
    assert tau[2, 2, 0].item() == pytest.approx(18 / 27)  # face
    assert tau[2, 2, 2].item() == pytest.approx(1.0)


@pytest.mark.parametrize("padding", ["replicate", "background"])
@pytest.mark.parametrize("kernel", ["mean", "gaussian"])
def test_prior_sums_to_one_everywhere(padding, kernel, rng):
    lab = torch.randint(0, 4, (2, 1, 7, 6, 5), generator=rng)
    tau = neighbor_prior(lab, 4, kernel=kernel, kernel_size=(3, 5, 3), padding=padding)
    assert torch.allclose(tau.sum(1), torch.ones(2, 7, 6, 5), atol=1e-6)


@pytest.mark.parametrize("padding", ["replicate", "zeros", "background"])
@pytest.mark.parametrize("kernel", ["mean", "gaussian"])
@pytest.mark.parametrize("ignore_index", [None, 7])
@pytest.mark.parametrize("kernel_size", [3, (5, 3, 1), 7])
def test_matches_bruteforce_reference_3d(padding, kernel, ignore_index, kernel_size, rng):
    lab = torch.randint(0, 3, (2, 1, 9, 8, 7), generator=rng)
    if ignore_index is not None:
        lab[torch.rand(lab.shape, generator=rng) < 0.2] = ignore_index
    got = neighbor_prior(lab, 3, kernel, kernel_size, 1.3, padding, ignore_index, dtype=torch.float64)
    ref = reference_prior(lab, 3, kernel, kernel_size, 1.3, padding, ignore_index)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_matches_reference_2d_float_labels(rng):
    lab = torch.randint(0, 5, (1, 1, 11, 10), generator=rng).float()
    got = neighbor_prior(lab, 5, "gaussian", (3, 5), (1.0, 2.0), dtype=torch.float64)
    torch.testing.assert_close(got, reference_prior(lab, 5, "gaussian", (3, 5), (1.0, 2.0)))


def test_svls_kernel_centre_is_half():
    k = dense_kernel("gaussian", 3, 1.0, 3)
    assert k.sum().item() == pytest.approx(1.0)
    assert k[1, 1, 1].item() == pytest.approx(0.5)
    assert k[0, 0, 0] < k[0, 0, 1] < k[0, 1, 1] == k[1, 1, 0]  # corner < edge < face
    assert dense_kernel("gaussian", 1, 1.0, 3).item() == 1.0


def test_ignored_only_neighbourhood_gives_zero():
    lab = torch.full((1, 1, 5, 5, 5), 9)
    lab[0, 0, 0, 0, 0] = 1
    tau = neighbor_prior(lab, 2, ignore_index=9)
    assert tau[0, :, 4, 4, 4].abs().sum() == 0
    assert tau[0, 1, 0, 0, 0] == 1.0  # only valid neighbour is itself


def test_half_output_and_large_box_counts():
    lab = torch.ones(1, 1, 9, 9, 9)
    tau = neighbor_prior(lab, 2, kernel_size=7, dtype=torch.float16)  # 343 taps: counts leave uint8
    assert tau.dtype == torch.float16
    assert torch.all(tau[0, 1] == 1)


def test_kernel_size_validation_and_spacing():
    assert ensure_kernel_size(3, 3) == (3, 3, 3)
    assert kernel_size_from_spacing(4.5, (1.5, 1.5, 10.0)) == (3, 3, 1)
    assert kernel_size_from_spacing(5.0, (1.0, 2.0, 0.6)) == (5, 3, 9)
    with pytest.raises(ValueError, match="odd"):
        ensure_kernel_size(4, 3)
    with pytest.raises(ValueError, match="entries"):
        ensure_kernel_size((3, 3), 3)
    with pytest.raises(ValueError, match="positive"):
        kernel_size_from_spacing(3.0, (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="kernel must be"):
        neighbor_prior(torch.zeros(1, 1, 3, 3), 2, kernel="box")
    with pytest.raises(ValueError, match="B,1"):
        neighbor_prior(torch.zeros(1, 2, 3, 3), 2)


def test_kernel_size_and_sigma_types():
    import numpy as np

    from monai_nacl.neighbor_prior import check_kernel_size, check_sigma

    assert check_kernel_size(np.int64(5)) == 5 and check_kernel_size(torch.tensor([3, 1, 3])) == (3, 1, 3)
    assert ensure_kernel_size(torch.tensor(3), 2) == (3, 3)
    for bad in (3.0, True, "3", None, (), (3, 3.0)):
        with pytest.raises(ValueError, match=r"kernel_size must be an odd positive integer .*\(\w+\)"):
            check_kernel_size(bad)
    with pytest.raises(ValueError, match=r"kernel_size .*3\.0 \(float\)"):
        neighbor_prior(torch.zeros(1, 1, 3, 3), 2, kernel_size=3.0)
    assert check_sigma(np.float32(1.5)) == 1.5 and check_sigma([1, 2.0]) == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"sigma must be a real number .*'1' \(str\)"):
        check_sigma("1")
    with pytest.raises(ValueError, match="sigma must be finite"):
        neighbor_prior(torch.zeros(1, 1, 3, 3), 2, kernel="gaussian", sigma=float("nan"))


def test_ensure_sigma_repeats_or_checks_per_axis():
    from monai_nacl import neighbor_prior as prior

    assert prior.ensure_sigma(1.5, 3) == (1.5, 1.5, 1.5)
    assert prior.ensure_sigma([1, 2.0], 2) == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"sigma must be positive and finite with 3 entries, got \(1\.0, 2\.0\)"):
        prior.ensure_sigma((1.0, 2.0), 3)
    with pytest.raises(ValueError, match=r"sigma must be a real number .*'1' \(str\)"):
        prior.ensure_sigma("1", 2)
    assert not hasattr(prior, "_ensure_sigma")  # one public name
