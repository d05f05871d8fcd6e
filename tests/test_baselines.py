from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_prior
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.losses import FocalLoss as MonaiFocalLoss

from monai_nacl.losses import (
    CrossEntropyLoss,
    DiceCELoss,
    ECPLoss,
    FocalLoss,
    LabelSmoothingLoss,
    MbLSLoss,
    SVLSLoss,
)

ALL = [CrossEntropyLoss, DiceCELoss, ECPLoss, FocalLoss, LabelSmoothingLoss, MbLSLoss, SVLSLoss]


@pytest.fixture
def data(rng):
    x = torch.randn(2, 3, 6, 5, 4, generator=rng, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=rng)
    return x, y


def test_cross_entropy_and_label_smoothing_match_torch(data):
    x, y = data
    assert CrossEntropyLoss(3)(x, y).item() == pytest.approx(F.cross_entropy(x, y[:, 0]).item())
    ls = LabelSmoothingLoss(3, epsilon=0.2)(x, y).item()
    assert ls == pytest.approx(F.cross_entropy(x, y[:, 0], label_smoothing=0.2).item())


def test_dice_ce_and_focal_match_monai(data):
    x, y = data
    ref = MonaiDiceCELoss(to_onehot_y=True, softmax=True)(x, y)
    assert DiceCELoss(3)(x, y).item() == pytest.approx(ref.item(), rel=1e-6)
    ref = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=3.0)(x, y)
    assert FocalLoss(3, gamma=3.0)(x, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_ecp_hand_formula(data):
    x, y = data
    p = torch.softmax(x, 1)
    entropy = -(p * p.log()).sum(1).mean()
    ref = F.cross_entropy(x, y[:, 0]) - 0.3 * entropy
    assert ECPLoss(3, beta=0.3)(x, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_mbls_hand_computed():
    x = torch.tensor([12.0, 0.0, 5.0]).view(1, 3, 1, 1, 1)
    y = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long)
    ce = F.cross_entropy(x.view(1, 3), torch.tensor([0])).item()
    # gaps to the max: 0, 12, 7 -> relu(gap - 10) = 0, 2, 0 -> mean over classes 2/3
    assert MbLSLoss(3, margin=10.0, lambda_margin=0.5)(x, y).item() == pytest.approx(ce + 0.5 * 2 / 3)


def test_svls_is_soft_ce_against_svls_prior(data):
    x, y = data
    tau = reference_prior(y, 3, "gaussian")
    ref = -(tau * F.log_softmax(x, 1)).sum(1).mean()
    loss_fn = SVLSLoss(3)
    assert loss_fn(x, y).item() == pytest.approx(ref.item(), rel=1e-6)
    assert loss_fn(x, y, prior=tau).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("loss_cls", ALL)
def test_ignore_index_and_gradients(loss_cls, data):
    x, y = data
    y = y.clone()
    y[0, 0, :2] = 255
    loss_fn = loss_cls(3, ignore_index=255)
    loss = loss_fn(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss)
    assert torch.all(g[0, :, :2] == 0), "ignored voxels must get no gradient"
    x2 = x.detach().clone()
    x2[0, :, :2] = 50.0
    assert loss_fn(x2, y).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("loss_cls", ALL)
def test_bad_labels_raise(loss_cls, data):
    x, y = data
    with pytest.raises(ValueError, match="outside"):
        loss_cls(3)(x, y + 1)
    with pytest.raises(ValueError, match="channels"):
        loss_cls(4)(x, y)


def test_focal_ignore_index_does_not_change_the_scale(data):
    """MONAI 1.6.1's focal mean with ignore_index divides by voxels only (C times larger); ours is the same
    mean over classes and valid voxels with or without an ignore index."""
    x, y = data
    plain = FocalLoss(3)(x, y)
    assert FocalLoss(3, ignore_index=255)(x, y).item() == pytest.approx(plain.item(), rel=1e-6)
    y = y.clone()
    y[1] = 255
    ref = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=3.0)(x[:1], y[:1])
    assert FocalLoss(3, ignore_index=255)(x, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_focal_sum_and_weight(data):
    x, y = data
    per_elem = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, reduction="none")(x, y)
    assert FocalLoss(3, gamma=2.0, reduction="sum")(x, y).item() == pytest.approx(per_elem.sum().item(), rel=1e-6)
    w = [0.5, 1.0, 2.0]
    ref = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=w)(x, y)
    assert FocalLoss(3, gamma=2.0, weight=w)(x, y).item() == pytest.approx(ref.item(), rel=1e-6)
