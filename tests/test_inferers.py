"""MirrorInferer: the mean of the network's logits over every mirroring, flipped back."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from monai_nacl.inferers import MirrorInferer


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


@pytest.mark.parametrize("axes", [[], [0, 0], [-1]])
def test_bad_axes(axes):
    with pytest.raises(ValueError, match="spatial_axes"):
        MirrorInferer(spatial_axes=axes)


def test_axes_beyond_the_input_are_named():
    with pytest.raises(ValueError, match=r"2 spatial dimensions"):
        MirrorInferer()(torch.zeros(1, 1, 4, 4), lambda t: t)
