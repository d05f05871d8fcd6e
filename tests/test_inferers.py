"""MirrorInferer: the mean of the network's logits over every mirroring, flipped back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from monai_nacl.inferers import MirrorInferer, describe_inferer


def _net():
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 3, 3, padding=1).double().eval()


def test_mean_over_all_mirrorings_matches_brute_force():
    net, x = _net(), torch.randn(2, 1, 6, 7, 5, dtype=torch.float64)
    outs = []
    for n in range(4):
        for axes in itertools.combinations((2, 3, 4), n):
            outs.append(torch.flip(net(torch.flip(x, axes)), axes) if axes else net(x))
    expected = torch.stack(outs).mean(0)
    with torch.no_grad():
        got = MirrorInferer()(x, net)
    assert len(outs) == 8
    assert torch.allclose(got, expected.detach(), atol=1e-12)
    assert not torch.allclose(got, net(x).detach(), atol=1e-3)  # the conv is not mirror-symmetric


def test_mirror_symmetric_network_is_unchanged_and_wraps_sliding_windows():
    net = torch.nn.Conv3d(1, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        w = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64)
        for d in (2, 3, 4):
            w = w + torch.flip(w, (d,))
        net.weight.copy_(w)
    x = torch.randn(1, 1, 9, 9, 9, dtype=torch.float64)
    sw = SlidingWindowInferer(roi_size=(9, 9, 9))
    with torch.no_grad():
        assert torch.allclose(MirrorInferer(sw)(x, net), sw(x, net), atol=1e-10)


def test_subset_of_axes():
    net, x = _net(), torch.randn(1, 1, 4, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        got = MirrorInferer(spatial_axes=[1])(x, net)
        expected = (net(x) + torch.flip(net(torch.flip(x, (3,))), (3,))) / 2
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("axes", [[], [0, 0], [-1], [0.7], [True], ["x"], "01", None])
def test_bad_axes(axes):
    with pytest.raises(ValueError, match="spatial_axes"):
        MirrorInferer(spatial_axes=axes)


def test_one_axis_and_bad_inferers():
    from monai.inferers import SimpleInferer

    assert MirrorInferer(spatial_axes=2).spatial_axes == (2,)
    assert MirrorInferer(spatial_axes=np.array([0, 2])).spatial_axes == (0, 2)
    assert MirrorInferer(spatial_axes=torch.tensor([1])).spatial_axes == (1,)
    with pytest.raises(ValueError, match="the class SimpleInferer"):
        MirrorInferer(SimpleInferer)
    with pytest.raises(ValueError, match="MONAI Inferer object, got function"):
        MirrorInferer(lambda x, net: net(x))
    for bad in (3, lambda x: x, SimpleInferer):
        with pytest.raises(ValueError, match="describe_inferer takes a MONAI Inferer"):
            describe_inferer(bad)


def test_outputs_that_cannot_be_flipped_back_are_refused():
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"spatial shape \(4, 4, 4\), got torch.float32 of shape \(1, 1, 4, 4, 2\)"):
        MirrorInferer()(x, lambda t: t[..., :2])
    with pytest.raises(ValueError, match="floating-point outputs"):
        MirrorInferer()(x, lambda t: t.long())
    with pytest.raises(TypeError, match="batched tensor input"):
        MirrorInferer()([x], lambda t: t)


def test_axes_beyond_the_input_are_named():
    with pytest.raises(ValueError, match=r"2 spatial dimensions"):
        MirrorInferer()(torch.zeros(1, 1, 4, 4), lambda t: t)


def test_describe_inferer_keeps_what_changes_the_probabilities():
    from monai.inferers import SimpleInferer, SlidingWindowInferer, SlidingWindowInfererAdapt

    window = SlidingWindowInferer(roi_size=(40, 56, 40), sw_batch_size=1, overlap=0.25)
    assert describe_inferer(window) == (
        "SlidingWindowInferer(roi_size=[40, 56, 40], overlap=[0.25, 0.25, 0.25], mode=constant, "
        "padding_mode=constant, cval=0)"
    )
    # what does not change the result, and equivalent spellings, give the same description
    for same in (
        SlidingWindowInferer(roi_size=[40, 56, 40], sw_batch_size=8, overlap=(0.25, 0.25, 0.25), sw_device="cpu"),
        SlidingWindowInfererAdapt(roi_size=[40, 56, 40], overlap=0.25),
    ):
        assert describe_inferer(same) == describe_inferer(window)
    assert describe_inferer(SlidingWindowInferer(64)) == describe_inferer(SlidingWindowInferer([64, 64, 64]))
    # a 2D window: a scalar takes its axis count from the settings given per axis
    planar = describe_inferer(SlidingWindowInferer([64, 64], overlap=0.5))
    assert planar == describe_inferer(SlidingWindowInferer(64, overlap=[0.5, 0.5]))
    assert "roi_size=[64, 64], overlap=[0.5, 0.5]" in planar
    # what changes the probabilities changes the description
    for other in (
        SlidingWindowInferer(roi_size=(40, 56, 40), overlap=0.5),
        SlidingWindowInferer(roi_size=(40, 56, 40), overlap=0.25, mode="gaussian"),
        SlidingWindowInferer(roi_size=(40, 56, 40), overlap=0.25, padding_mode="replicate"),
        SlidingWindowInferer(roi_size=(40, 56, 40), overlap=0.25, cval=-1.0),
        SlidingWindowInferer(roi_size=(40, 48, 40), overlap=0.25),
        MirrorInferer(window),
    ):
        assert describe_inferer(other) != describe_inferer(window), other
    gaussian = SlidingWindowInferer(roi_size=(40, 56, 40), overlap=0.5, mode="gaussian", sigma_scale=0.25)
    assert "mode=gaussian, sigma_scale=[0.25, 0.25, 0.25]" in describe_inferer(gaussian)
    mirrored = describe_inferer(MirrorInferer(window))
    assert mirrored == f"MirrorInferer(spatial_axes=[0, 1, 2], {describe_inferer(window)})"
    assert mirrored == describe_inferer(MirrorInferer(window, spatial_axes=(2, 1, 0)))  # the same flips
    assert describe_inferer(MirrorInferer(spatial_axes=(2,))) == "MirrorInferer(spatial_axes=[2], SimpleInferer())"
    assert describe_inferer(SimpleInferer()) == "SimpleInferer()"
    assert describe_inferer(None) is None and describe_inferer(mirrored) == mirrored


def test_records_name_their_inferer_and_inference_with_another_is_reported(tmp_path):
    """The temperature and conformal records keep the inferer they were fitted through; inference with mirror
    test-time augmentation on weights calibrated without it is reported (and refused when strict)."""
    import warnings

    from monai.inferers import SlidingWindowInferer

    from monai_nacl.conformal import (
        ConformalRiskControl,
        check_conformal_record,
        save_conformal,
        warn_if_conformal_stale,
    )
    from monai_nacl.temperature import (
        TemperatureScaled,
        check_calibration_record,
        save_calibrated,
        warn_if_not_calibrated,
        weights_fingerprint,
    )

    window = SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.25)
    net = TemperatureScaled(torch.nn.Conv3d(1, 3, 3, padding=1))
    net.set_temperature(torch.tensor([1.3]))
    weights = tmp_path / "model.pt"
    save_calibrated(net.state_dict(), weights, inferer=describe_inferer(window))
    crc = ConformalRiskControl(3, bins=20)
    p = torch.softmax(torch.randn(4, 3, 6, 6, 6, generator=torch.Generator().manual_seed(0)), 1)
    crc.update(p, p.argmax(1, keepdim=True))
    crc.fit(0.2)
    save_conformal(weights, [crc], weights_fingerprint(net), net.temperature, inferer=describe_inferer(window))

    assert check_calibration_record(weights, window) == [] and check_conformal_record(weights, window) == []
    assert check_calibration_record(weights) == [] and check_conformal_record(weights) == []  # not asked: not checked
    tta = MirrorInferer(window)
    [temperature_problem] = check_calibration_record(weights, tta)
    assert "temperature fitted on the probabilities of SlidingWindowInferer" in temperature_problem
    assert "inference uses MirrorInferer(spatial_axes=[0, 1, 2]" in temperature_problem
    [threshold_problem] = check_conformal_record(weights, tta)
    assert "model.conformal.json: thresholds fitted on the probabilities of SlidingWindowInferer" in threshold_problem
    with pytest.raises(ValueError, match="MirrorInferer"):
        warn_if_not_calibrated(weights, strict=True, inferer=tta)
    with pytest.raises(ValueError, match="MirrorInferer"):
        warn_if_conformal_stale(weights, strict=True, inferer=tta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_not_calibrated(weights, inferer=tta) == [temperature_problem]
    assert [str(w.message) for w in caught] == [temperature_problem] and caught[0].filename == __file__

    # a record written before inferers were recorded names none: nothing to compare, nothing reported
    save_calibrated(net.state_dict(), weights)
    assert check_calibration_record(weights, tta) == []
