from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monai_nacl.losses import DiceCELoss, HardL1ACELoss, SoftL1ACELoss, binned_calibration

LOSSES = [HardL1ACELoss, SoftL1ACELoss]


def _memberships(p: float, m: int, soft: bool) -> dict[int, float]:
    """Bin memberships of one probability, written from the definitions with plain floats."""
    if not soft:
        for k in range(m):
            if k / m <= p < (k + 1) / m:
                return {k: 1.0}
        return {m - 1: 1.0}  # p == 1
    centres = [(k + 0.5) / m for k in range(m)]
    if p <= centres[0]:
        return {0: 1.0}
    if p >= centres[-1]:
        return {m - 1: 1.0}
    for k in range(m - 1):
        if centres[k] <= p < centres[k + 1]:
            right = (p - centres[k]) * m
            return {k: 1.0 - right, k + 1: right}
    raise AssertionError(p)


def reference_ace(x, y, num_bins, soft, include_background=True, ignore_index=None, empty_weight=0.0):
    """mL1-ACE by Python loops over images, classes, bins and voxels (float64)."""
    prob = torch.softmax(x.detach().double(), 1)
    b, c = prob.shape[:2]
    per_pair = []
    for i in range(b):
        p_img = prob[i].reshape(c, -1)
        y_img = y[i].reshape(-1).tolist()
        for k in range(0 if include_background else 1, c):
            count = [0.0] * num_bins
            sum_p = [0.0] * num_bins
            sum_y = [0.0] * num_bins
            for v, label in enumerate(y_img):
                if ignore_index is not None and label == ignore_index:
                    continue
                p = float(p_img[k, v])
                for m, w in _memberships(p, num_bins, soft).items():
                    count[m] += w
                    sum_p[m] += w * p
                    sum_y[m] += w * float(label == k)
            gaps = [abs(sum_p[m] / count[m] - sum_y[m] / count[m]) for m in range(num_bins) if count[m] > empty_weight]
            if gaps:
                per_pair.append(sum(gaps) / len(gaps))
    return sum(per_pair) / len(per_pair) if per_pair else 0.0


@pytest.fixture
def data(rng):
    x = (2 * torch.randn(2, 3, 5, 4, 3, generator=rng, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 3, (2, 1, 5, 4, 3), generator=rng)
    return x, y


@pytest.mark.parametrize("loss_cls", LOSSES)
@pytest.mark.parametrize("num_bins", [1, 3, 10])
@pytest.mark.parametrize("include_background", [True, False])
def test_matches_brute_force(loss_cls, num_bins, include_background, data):
    x, y = data
    soft = loss_cls is SoftL1ACELoss
    loss = loss_cls(3, num_bins=num_bins, include_background=include_background)(x, y)
    ew = 0.01 if soft else 0.0
    ref = reference_ace(x, y, num_bins, soft, include_background, empty_weight=ew)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_hard_known_value():
    # one image, 2 classes, 4 voxels; p_1 = 0.9, 0.9, 0.2, 0.2 with labels 1, 0, 0, 0 and 2 bins:
    # class 1: bin [0.5, 1): |0.9 - 1/2|, bin [0, 0.5): |0.2 - 0| -> (0.4 + 0.2) / 2 = 0.3; class 0 is symmetric.
    p1 = torch.tensor([0.9, 0.9, 0.2, 0.2], dtype=torch.float64)
    x = torch.stack([torch.zeros(4, dtype=torch.float64), torch.log(p1 / (1 - p1))]).view(1, 2, 4, 1)
    y = torch.tensor([1, 0, 0, 0]).view(1, 1, 4, 1)
    assert HardL1ACELoss(2, num_bins=2)(x, y).item() == pytest.approx(0.3)
    assert HardL1ACELoss(2, num_bins=2, include_background=False)(x, y).item() == pytest.approx(0.3)


def test_perfectly_calibrated_is_zero():
    # every voxel predicts 0.25 for class 1 and a quarter of the voxels are class 1
    x = torch.stack([torch.zeros(8), torch.full((8,), math.log(1 / 3))]).view(1, 2, 8, 1)
    y = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0]).view(1, 1, 8, 1)
    for loss_cls in LOSSES:
        assert loss_cls(2, num_bins=10)(x, y).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_gradcheck(rng):
    x = (2 * torch.randn(2, 3, 3, 2, 2, generator=rng, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 3, (2, 1, 3, 2, 2), generator=rng)
    y[0, 0, 0] = 255
    loss_fn = SoftL1ACELoss(3, num_bins=5, ignore_index=255, empty_weight=0.0)
    assert torch.autograd.gradcheck(lambda t: loss_fn(t, y), (x,), eps=1e-6, atol=1e-6)
    with_base = SoftL1ACELoss(3, num_bins=5, base="dice_ce", ace_weight=0.5)
    assert torch.autograd.gradcheck(lambda t: with_base(t, y.clamp_max(2)), (x,), eps=1e-6, atol=1e-6)


def test_hard_gradient_is_finite_and_flows_through_mean_probabilities(data):
    x, y = data
    loss = HardL1ACELoss(3, num_bins=10)(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # inside a bin the hard loss is smooth in p: gradcheck on a tiny perturbation that keeps every bin assignment
    y2 = y.clone()
    loss_fn = HardL1ACELoss(3, num_bins=4)
    assert torch.autograd.gradcheck(lambda t: loss_fn(t, y2), (x,), eps=1e-8, atol=1e-5)


def test_half_precision_input_is_finite(data):
    x, y = data
    loss = HardL1ACELoss(3)(x.detach().half(), y)
    assert loss.dtype == torch.float16 and torch.isfinite(loss)


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_ignore_index(loss_cls, data):
    x, y = data
    y = y.clone()
    y[0, 0, :2] = 255
    loss_fn = loss_cls(3, num_bins=6, ignore_index=255)
    loss = loss_fn(x, y)
    ref = reference_ace(x, y, 6, loss_cls is SoftL1ACELoss, ignore_index=255, empty_weight=loss_fn.empty_weight)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    assert torch.all(g[0, :, :2] == 0), "ignored voxels must get no gradient"
    x2 = x.detach().clone()
    x2[0, :, :2] = 50.0
    assert loss_fn(x2, y).item() == pytest.approx(loss.item(), rel=1e-10)
    # a one-hot target with all-zero voxels is the same as ignore_index there
    onehot = F.one_hot(y[:, 0].clamp_max(2), 3).movedim(-1, 1)
    onehot[0, :, :2] = 0
    assert loss_fn(x, onehot).item() == pytest.approx(loss.item(), rel=1e-10)


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_fully_ignored_image_is_left_out_and_empty_batch_is_zero(loss_cls, data):
    x, y = data
    y = y.clone()
    y[1] = 255
    loss_fn = loss_cls(3, num_bins=5, ignore_index=255)
    assert loss_fn(x, y).item() == pytest.approx(loss_cls(3, num_bins=5)(x[:1], y[:1]).item(), rel=1e-10)
    y[:] = 255
    loss = loss_fn(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.all(g == 0)


def test_base_terms(data):
    x, y = data
    ace = SoftL1ACELoss(3)(x, y)
    dice_ce = DiceCELoss(3)(x, y)
    loss_fn = SoftL1ACELoss(3, base="dice_ce", ace_weight=0.3)
    assert loss_fn(x, y).item() == pytest.approx(dice_ce.item() + 0.3 * ace.item(), rel=1e-10)
    assert loss_fn.last_components["ace"].item() == pytest.approx(ace.item(), rel=1e-10)
    ce = F.cross_entropy(x, y[:, 0])
    assert HardL1ACELoss(3, base="ce")(x, y).item() == pytest.approx(
        ce.item() + HardL1ACELoss(3)(x, y).item(), rel=1e-10
    )


def test_sum_reduction(data):
    x, y = data
    mean = HardL1ACELoss(3, num_bins=5)(x, y)
    assert HardL1ACELoss(3, num_bins=5, reduction="sum")(x, y).item() == pytest.approx(6 * mean.item(), rel=1e-10)


def test_binned_calibration_soft_counts_sum_to_voxels(data):
    x, y = data
    prob = torch.softmax(x, 1)
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1)
    for mode in ("hard", "soft"):
        count, conf, freq = binned_calibration(prob, onehot, num_bins=7, mode=mode)
        assert count.shape == (2, 3, 7)
        assert torch.allclose(count.sum(-1), torch.full((2, 3), 60.0, dtype=torch.float64))
        assert ((conf >= 0) & (conf <= 1) & (freq >= 0) & (freq <= 1)).all()


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_bad_options(loss_cls):
    for bad in (0, -3, 2.0, True, "20"):
        with pytest.raises(ValueError, match="num_bins"):
            loss_cls(3, num_bins=bad)
    with pytest.raises(ValueError, match="num_classes"):
        loss_cls(1)
    with pytest.raises(ValueError, match="base"):
        loss_cls(3, base="dice")
    with pytest.raises(ValueError, match="ace_weight"):
        loss_cls(3, ace_weight=-1.0)
    with pytest.raises(ValueError, match="empty_weight"):
        loss_cls(3, empty_weight=float("nan"))
    with pytest.raises(ValueError, match="include_background"):
        loss_cls(3, include_background="no")
    with pytest.raises(ValueError, match="ignore_index"):
        loss_cls(3, ignore_index="255")
    with pytest.raises(ValueError, match="reduction"):
        loss_cls(3, reduction="none")


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_bad_inputs(loss_cls, data):
    x, y = data
    loss_fn = loss_cls(3)
    with pytest.raises(ValueError, match="channels"):
        loss_cls(4)(x, y)
    with pytest.raises(ValueError, match="outside"):
        loss_fn(x, y + 1)
    with pytest.raises(ValueError, match="target shape"):
        loss_fn(x, y[..., :2])
    with pytest.raises(ValueError, match="shape B,C,H,W"):
        loss_fn(x[:, :, 0, 0], y[:, :, 0, 0])
    with pytest.raises(ValueError, match="floating point"):
        loss_fn(y.repeat(1, 3, 1, 1, 1), y)
    with pytest.raises(ValueError, match="non-integer"):
        loss_fn(x, y.double() + 0.5)
    with pytest.raises(ValueError, match="torch.Tensor"):
        loss_fn(x, y.tolist())
    bad = x.detach().clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits"):
        loss_fn(bad, y)
