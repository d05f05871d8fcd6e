"""Bad inputs at the public entry points: each gets a clear error naming the argument, or a correct value.

The table in docs/reliability.md lists these inputs with the behaviour before and after.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from monai_nacl.handlers import PriorFromBatch
from monai_nacl.losses import (
    CrossEntropyLoss,
    DiceCELoss,
    ECPLoss,
    FocalLoss,
    LabelSmoothingLoss,
    MbLSLoss,
    NACLLoss,
    SVLSLoss,
)
from monai_nacl.metrics import CalibrationMetric
from monai_nacl.transforms import NeighborPrior, NeighborPriord, VoxelEntropy, VoxelEntropyd

BASELINES = [CrossEntropyLoss, DiceCELoss, ECPLoss, FocalLoss, LabelSmoothingLoss, MbLSLoss, SVLSLoss]
LOSSES = [NACLLoss, *BASELINES]


@pytest.fixture
def data(rng):
    x = torch.randn(2, 3, 5, 4, 3, generator=rng, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 5, 4, 3), generator=rng)
    return x, y


def _fractional(y: torch.Tensor) -> torch.Tensor:
    y = y.float().clone()
    y[0, 0, 1, 2, 1] = 1.9
    return y


# 1. fractional labels: never floored -----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_losses_reject_fractional_labels_and_accept_integral_floats(loss_cls, data):
    x, y = data
    loss_fn = loss_cls(3)
    with pytest.raises(ValueError, match=r"target must hold integer class labels.*\[1\.9\].*index \(0, 0, 1, 2, 1\)"):
        loss_fn(x, _fractional(y))
    assert loss_fn(x, y.float()).item() == pytest.approx(loss_fn(x, y).item())


def test_prior_transforms_reject_fractional_labels(data):
    _, y = data
    lab = _fractional(y)[0]
    with pytest.raises(ValueError, match=r"label must hold integer class labels.*\[1\.9\]"):
        NeighborPrior(3)(lab)
    with pytest.raises(ValueError, match=r"key 'label': label must hold integer class labels.*\[1\.9\]"):
        NeighborPriord("label", 3)({"label": MetaTensor(lab)})
    torch.testing.assert_close(NeighborPrior(3)(y[0].float()), NeighborPrior(3)(y[0]))


def test_metric_rejects_fractional_labels(data):
    x, y = data
    p = torch.softmax(x.detach(), 1)
    with pytest.raises(ValueError, match=r"target must hold integer class labels.*\[1\.9\]"):
        CalibrationMetric(3)(p, _fractional(y))
    a, b = CalibrationMetric(3), CalibrationMetric(3)
    a(p, y.float())
    b(p, y)
    assert a.aggregate() == b.aggregate()


def test_nan_labels_are_named(data):
    x, y = data
    y = y.float().index_fill(2, torch.tensor([1]), float("nan"))
    with pytest.raises(ValueError, match=r"target contains NaN or Inf \(first at index \(0, 0, 1, 0, 0\)\)"):
        NACLLoss(3)(x, y)


def test_uint8_labels_do_not_wrap_onto_a_negative_ignore_index(data):
    # uint8 255 == -1 is True in torch (the scalar wraps): 255 must not be taken for ignore_index=-1
    x, _ = data
    y = torch.full((2, 1, 5, 4, 3), 255, dtype=torch.uint8)
    for loss_fn in (CrossEntropyLoss(3, ignore_index=-1), NACLLoss(3, ignore_index=-1)):
        with pytest.raises(ValueError, match=r"label values \[255\] outside \[0, 3\) or ignore_index=-1"):
            loss_fn(x, y)
    with pytest.raises(ValueError, match=r"\[255\]"):
        NeighborPrior(3, ignore_index=-1)(y[0])


# 2. and 6. probabilities ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (torch.sigmoid, r"y_pred must be probabilities \(softmax over channels\); got channel sums in \[\d"),
        (lambda x: x, r"y_pred must be probabilities \(softmax over channels\) in \[0, 1\]; got values in \[-"),
        (lambda x: torch.softmax(x, 2), r"channel sums in"),  # probabilities over the wrong axis
        (lambda x: torch.softmax(x, 1).index_fill(3, torch.tensor([0]), 0.0), r"channel sums in \[0, 1\]"),
        (lambda x: torch.softmax(x, 1).index_fill(2, torch.tensor([0]), float("nan")), "y_pred contains NaN"),
    ],
)
def test_metric_rejects_what_is_not_a_distribution_over_channels(make, match, data):
    x, y = data
    with pytest.raises(ValueError, match=match):
        CalibrationMetric(3)(make(x.detach()), y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_metric_accepts_softmax_in_any_floating_dtype(dtype, data):
    x, y = data
    m = CalibrationMetric(3)
    m(torch.softmax(x.detach().to(dtype), 1), y)
    assert m.aggregate()["n_voxels"] == y.numel()


def test_metric_detaches_predictions_that_require_grad(data):
    x, y = data
    p = torch.softmax(x, 1)  # part of a graph
    a, b = CalibrationMetric(3), CalibrationMetric(3)
    a(p, y)
    b(p.detach(), y)
    assert a.aggregate() == b.aggregate()


@pytest.mark.parametrize("entropy", [VoxelEntropy(), VoxelEntropyd("pred")])
def test_entropy_rejects_logits_and_sigmoid_outputs(entropy, data):
    x, _ = data
    logits = x.detach()[0]

    def call(t):
        return entropy({"pred": t})["entropy"] if isinstance(entropy, VoxelEntropyd) else entropy(t)

    with pytest.raises(ValueError, match=r"prob must be probabilities \(softmax over channels\) in \[0, 1\]"):
        call(logits)
    with pytest.raises(ValueError, match="prob must be probabilities .* channel sums"):
        call(torch.sigmoid(logits))
    h = call(torch.softmax(logits, 0))
    assert h.shape == (1, 5, 4, 3) and bool((h >= 0).all()) and bool((h <= 1 + 1e-6).all())


def test_entropy_rejects_a_batch_axis_and_accepts_half_and_integer_inputs(data):
    x, y = data
    with pytest.raises(ValueError, match="no batch axis"):
        VoxelEntropy()(torch.softmax(x.detach(), 1))
    with pytest.raises(ValueError, match="prob contains NaN or Inf"):
        VoxelEntropy()(torch.softmax(x.detach()[0], 0).index_fill(1, torch.tensor([0]), float("nan")))
    half = VoxelEntropy()(torch.softmax(x.detach()[0], 0).half())
    torch.testing.assert_close(half, VoxelEntropy()(torch.softmax(x.detach()[0], 0)), atol=2e-3, rtol=0)
    onehot = F.one_hot(y[0, 0], 3).movedim(-1, 0)  # int64 one-hot is a valid (certain) distribution
    assert VoxelEntropy()(onehot).abs().max() == 0


def test_entropy_accepts_probabilities_resampled_back_by_invertd():
    """The bundles' inference order: softmax, Invertd (bilinear, border padding), then VoxelEntropyd."""
    from monai.transforms import Invertd

    from monai_nacl.transforms import SafeSpacingd

    g = torch.Generator().manual_seed(3)
    image = MetaTensor(torch.rand(1, 9, 7, 5, generator=g), affine=torch.diag(torch.tensor([0.7, 0.9, 2.5, 1.0])))
    pre = SafeSpacingd("image", pixdim=(1.0, 1.0, 1.0), mode="bilinear")
    data = pre({"image": image})
    logits = torch.randn(3, *data["image"].shape[1:], generator=g) * 4
    data["pred"] = MetaTensor(torch.softmax(logits, 0), meta=data["image"].meta, applied_operations=[])
    data["pred"].applied_operations = list(data["image"].applied_operations)
    out = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    assert out["pred"].shape == (3, 9, 7, 5)
    entropy = VoxelEntropyd("pred")(out)["entropy"]
    assert torch.isfinite(entropy).all()


def test_interpolated_probabilities_and_priors_are_accepted(data):
    """Bilinear grid_sample (RandAffined, Invertd) overshoots 1 by a few ulps, in values and in channel sums."""
    x, y = data
    g = torch.Generator().manual_seed(0)
    theta = (torch.randn(1, 3, 4, generator=g) * 0.3 + torch.eye(3, 4)).expand(2, 3, 4)
    grid = F.affine_grid(theta, (2, 3, 5, 4, 3), align_corners=False)
    p = F.grid_sample(torch.softmax(x.detach() * 50, 1), grid, padding_mode="border", align_corners=False)
    p[0, 0, 0, 0, 0], p[0, 1:, 0, 0, 0] = 1.0 + 2.4e-7, 0.0  # the largest overshoot seen in float32
    CalibrationMetric(3)(p, y)
    VoxelEntropy()(p[0])
    prior = NACLLoss(3).prior(y)
    prior[0, 0, 0, 0, 0] = 1.0 + 2.4e-7
    assert torch.isfinite(NACLLoss(3)(x, y, prior=prior))


# 3. all-ignored patches: zero loss, zero gradient -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: NACLLoss(3, ignore_index=255), lambda: NACLLoss(3, ignore_index=255, base="dice_ce")]
    + [lambda c=c: c(3, ignore_index=255) for c in BASELINES]
    + [lambda c=c: c(3, ignore_index=255, reduction="sum") for c in BASELINES],
)
def test_all_ignored_patch_gives_zero_loss_and_zero_gradient(make, data):
    x, y = data
    loss = make()(x, torch.full_like(y, 255))
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert torch.all(g == 0)


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, DiceCELoss, ECPLoss, LabelSmoothingLoss, MbLSLoss])
def test_patch_without_weighted_voxels_gives_a_finite_ce(loss_cls, data):
    # weight 0 for the only class present: torch's weighted mean is 0/0; the CE term is 0 here
    x, y = data
    zeros = torch.zeros_like(y)
    loss = loss_cls(3, weight=[0.0, 1.0, 1.0])(x, zeros)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert CrossEntropyLoss(3, weight=[0.0, 1.0, 1.0])(x, zeros).item() == 0.0


def test_partly_ignored_mean_is_unchanged(data):
    # the zero-safe mean must equal torch's where torch is defined
    x, y = data
    y = y.clone()
    y[0] = 255
    w = torch.tensor([0.3, 1.0, 2.0])
    ref = F.cross_entropy(x, y[:, 0], weight=w, ignore_index=255, label_smoothing=0.1)
    got = LabelSmoothingLoss(3, epsilon=0.1, weight=w, ignore_index=255)(x, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


# 4. NaN prior, alpha, class weight: each named --------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [NACLLoss, SVLSLoss])
def test_nan_prior_is_named(loss_cls, data):
    x, y = data
    prior = NACLLoss(3).prior(y)
    prior[1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"prior contains NaN or Inf \(first at index \(1, 2, 0, 0, 0\)\)"):
        loss_cls(3)(x, y, prior=prior)


@pytest.mark.parametrize(
    "make, ignored",
    [
        (lambda: NACLLoss(3), False),
        (lambda: NACLLoss(3, alpha=0.0), False),
        (lambda: NACLLoss(3, penalty_on="softmax", distance="l2"), False),
        (lambda: NACLLoss(3, reduction="none"), False),
        (lambda: NACLLoss(3, base="dice_ce", ignore_index=255), True),
        (lambda: NACLLoss(3, ignore_index=255), True),
        (lambda: SVLSLoss(3, ignore_index=255), True),
    ],
)
def test_nan_prior_off_the_checked_subgrid_is_named_from_the_loss_value(make, ignored, rng):
    # 40 voxels per axis: the range check reads every 2nd voxel, so a NaN at odd indices reaches the loss
    x = torch.randn(1, 3, 40, 40, 40, generator=rng)
    y = torch.randint(0, 3, (1, 1, 40, 40, 40), generator=rng)
    prior = NACLLoss(3).prior(y)
    prior[0, 2, 1, 1, 1] = float("nan")
    if ignored:
        y[0, 0, 1, 1, 1] = 255  # NaN * 0 is still NaN: a NaN at an ignored voxel is found too
    with pytest.raises(ValueError, match=r"Loss: prior contains NaN or Inf \(first at index \(0, 2, 1, 1, 1\)\)"):
        make()(x, y, prior=prior)


@pytest.mark.parametrize("loss_cls", [NACLLoss, SVLSLoss])
def test_prior_outside_unit_interval_is_rejected(loss_cls, data):
    x, y = data
    with pytest.raises(ValueError, match=r"prior must hold class proportions in \[0, 1\].*got values in \[-"):
        loss_cls(3)(x, y, prior=x.detach())  # logits passed as the prior


def test_prior_that_is_not_a_tensor_is_named(data):
    x, y = data
    prior = NACLLoss(3).prior(y)
    with pytest.raises(ValueError, match="prior must be a torch.Tensor, got ndarray"):
        NACLLoss(3)(x, y, prior=prior.numpy())
    with pytest.raises(ValueError, match="prior must be a torch.Tensor, got ndarray"):
        SVLSLoss(3)(x, y, prior=prior.numpy())
    with pytest.raises(ValueError, match="prior must be a torch.Tensor, got list"):
        NACLLoss(3).use_prior_once([prior])
    # half and bool priors hold valid proportions
    ref = NACLLoss(3)(x, y, prior=prior).item()
    assert NACLLoss(3)(x, y, prior=prior.half()).item() == pytest.approx(ref, rel=1e-3)
    assert torch.isfinite(NACLLoss(3)(x, y, prior=prior > 0.5))


def test_nan_alpha_and_weight_are_named_at_construction():
    with pytest.raises(ValueError, match="alpha must be finite, got nan"):
        NACLLoss(3, alpha=float("nan"))
    for loss_cls in (NACLLoss, CrossEntropyLoss, DiceCELoss, FocalLoss, LabelSmoothingLoss, ECPLoss, MbLSLoss):
        with pytest.raises(ValueError, match=r"weight must hold 3 finite non-negative values.*\[1\.0, nan, 1\.0\]"):
            loss_cls(3, weight=[1.0, float("nan"), 1.0])
        with pytest.raises(ValueError, match="not all zero"):
            loss_cls(3, weight=[0, 0, 0])


def test_nan_alpha_set_after_construction_is_named_in_forward(data):
    x, y = data
    loss_fn = NACLLoss(3)
    loss_fn.alpha = float("nan")
    with pytest.raises(ValueError, match=r"NACLLoss: alpha is not finite \(nan\)"):
        loss_fn(x, y)


def test_non_finite_logits_are_named_with_their_index(data):
    x, y = data
    bad = x.detach().clone()
    bad[1, 0, 2, 1, 0] = float("inf")
    for loss_fn in (NACLLoss(3), CrossEntropyLoss(3), SVLSLoss(3)):
        with pytest.raises(ValueError, match=r"non-finite logits .*input has (inf|nan) at index \(1, 0, 2, 1, 0\)"):
            loss_fn(bad, y)


def test_overflow_with_finite_logits_says_so(data):
    x, y = data
    big = torch.full_like(x.detach(), 1e20)  # (1e20 - tau)^2 overflows float32
    with pytest.raises(ValueError, match=r"overflowed although its inputs are finite \(largest \|logit\| 1e\+20"):
        NACLLoss(3, distance="l2")(big, y)


# 5. option types ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda k: NACLLoss(3, kernel_size=k),
        lambda k: SVLSLoss(3, kernel_size=k),
        lambda k: NeighborPrior(3, kernel_size=k),
        lambda k: NeighborPriord("label", 3, kernel_size=k),
    ],
)
def test_kernel_size_type_errors_at_construction(make):
    with pytest.raises(ValueError, match=r"kernel_size must be an odd positive integer .*got 3\.0 \(float\)"):
        make(3.0)
    with pytest.raises(ValueError, match=r"got True \(bool\)"):
        make(True)
    with pytest.raises(ValueError, match=r"got '3' \(str\)"):
        make("3")
    with pytest.raises(ValueError, match=r"got \(3, 3\.0, 3\) \(tuple\)"):
        make((3, 3.0, 3))
    with pytest.raises(ValueError, match="positive odd"):
        make(4)
    make(np.int64(3))
    make(torch.tensor(3))
    make((np.int32(3), 1, 3))


def test_kernel_size_integer_scalars_give_the_same_loss(data):
    x, y = data
    ref = NACLLoss(3)(x, y).item()
    assert NACLLoss(3, kernel_size=np.int64(3))(x, y).item() == pytest.approx(ref)
    assert NACLLoss(3, kernel_size=torch.tensor(3))(x, y).item() == pytest.approx(ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": "0.1"}, r"alpha must be a real number \(int or float\), got '0\.1' \(str\)"),
        ({"alpha": True}, r"alpha must be a real number .*got True \(bool\)"),
        ({"alpha": -0.1}, r"alpha must be >= 0\.0, got -0\.1"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"sigma": "1.0", "kernel": "gaussian"}, r"sigma must be a real number .*'1\.0' \(str\)"),
        ({"sigma": 0.0}, r"sigma must be > 0\.0"),
        ({"lambda_dice": float("nan"), "base": "dice_ce"}, "lambda_dice must be finite"),
        ({"ignore_index": "255"}, r"ignore_index must be an integer, got '255' \(str\)"),
        ({"ignore_index": 255.0}, r"ignore_index must be an integer, got 255\.0 \(float\)"),
        ({"weight": "abc"}, r"weight must be a sequence of 3 numbers, got 'abc' \(str\)"),
    ],
)
def test_nacl_option_errors_name_value_and_type(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NACLLoss(3, **kwargs)


@pytest.mark.parametrize("alpha", [0, 1, 0.1, np.float32(0.1), np.float64(0.1), np.int64(1), torch.tensor(0.1)])
def test_nacl_accepts_real_alpha(alpha):
    assert NACLLoss(3, alpha=alpha).alpha == pytest.approx(float(alpha))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LabelSmoothingLoss(3, epsilon="0.1"), r"epsilon must be a real number .*'0\.1' \(str\)"),
        (lambda: LabelSmoothingLoss(3, epsilon=1.0), r"epsilon must be < 1\.0"),
        (lambda: ECPLoss(3, beta=float("nan")), "beta must be finite"),
        (lambda: ECPLoss(3, beta=-0.1), r"beta must be >= 0\.0"),
        (lambda: MbLSLoss(3, margin=float("nan")), "margin must be finite"),
        (lambda: MbLSLoss(3, lambda_margin="0.1"), r"lambda_margin must be a real number"),
        (lambda: FocalLoss(3, gamma=-1.0), r"gamma must be >= 0\.0, got -1\.0"),
        (lambda: FocalLoss(3, weight=[1.0, 1.0]), "weight must hold 3"),
        (lambda: DiceCELoss(3, lambda_ce=float("nan")), "lambda_ce must be finite"),
        (lambda: SVLSLoss(3, sigma=float("nan")), "sigma must be finite"),
        (lambda: SVLSLoss(3, ignore_index=[255]), r"ignore_index must be an integer, got \[255\] \(list\)"),
        (lambda: NeighborPrior(3, kernel="gaussian", sigma=float("nan")), "sigma must be finite"),
        (lambda: NeighborPrior(3, neighborhood_mm=-1.0), r"neighborhood_mm must be > 0\.0, got -1\.0"),
        (lambda: NeighborPrior(3, ignore_index="255"), "ignore_index must be an integer"),
        (lambda: CalibrationMetric(3, num_bins=True), r"num_bins must be an integer, got True \(bool\)"),
        (lambda: CalibrationMetric(3, num_bins=15.5), r"num_bins must be an integer, got 15\.5 \(float\)"),
        (lambda: CalibrationMetric(3, ignore_index="255"), "ignore_index must be an integer"),
    ],
)
def test_other_option_errors_name_the_option(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# 7. use_prior_once ----------------------------------------------------------------------------------------------


def test_prior_set_for_one_call_is_cleared_by_a_failing_call(data):
    x, y = data
    loss_fn = NACLLoss(3)
    ref = loss_fn(x, y).item()
    loss_fn.use_prior_once(torch.ones(2, 3, 5, 4, 3))  # would change the value visibly
    with pytest.raises(ValueError, match="outside"):
        loss_fn(x, y + 5)
    assert loss_fn(x, y).item() == pytest.approx(ref), "the failed call's prior leaked into the next call"


def test_prior_set_for_one_call_is_cleared_by_a_call_with_its_own_prior(data):
    x, y = data
    loss_fn = NACLLoss(3)
    ref = loss_fn(x, y).item()
    loss_fn.use_prior_once(torch.ones(2, 3, 5, 4, 3))
    assert loss_fn(x, y, prior=loss_fn.prior(y)).item() == pytest.approx(ref)  # the explicit prior wins
    assert loss_fn(x, y).item() == pytest.approx(ref)


def test_prior_from_batch_after_a_failed_iteration(data):
    """PriorFromBatch hands the prior over just before the loss; a loss that raises must not keep it."""
    x, y = data
    loss_fn = NACLLoss(3)
    ref = loss_fn(x, y).item()

    class _State:
        device = torch.device("cpu")
        batch = {"prior": torch.ones(2, 3, 5, 4, 3)}

    class _Engine:
        state = _State()
        non_blocking = False

    handler = PriorFromBatch(loss_fn)
    handler(_Engine())
    with pytest.raises(ValueError):
        loss_fn(x, _fractional(y))
    assert loss_fn(x, y).item() == pytest.approx(ref)
    _Engine.state.batch = {"prior": [torch.ones(3, 5, 4, 3)] * 2}
    with pytest.raises(ValueError, match=r"batch\['prior'\] must be a tensor B,C,\*spatial, got list"):
        handler(_Engine())


# shapes, dtypes and empty tensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_empty_batches_name_the_input(loss_cls, data):
    x, y = data
    with pytest.raises(ValueError, match=r"input is empty \(shape \(0, 3, 5, 4, 3\)\)"):
        loss_cls(3)(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"input is empty \(shape \(2, 3, 0, 4, 3\)\)"):
        loss_cls(3)(x[:, :, :0], y[:, :, :0])
    with pytest.raises(ValueError, match="input must be floating point"):
        loss_cls(3)(x.detach().long(), y)


def test_metric_empty_batch_names_y_pred(data):
    x, y = data
    with pytest.raises(ValueError, match=r"y_pred is empty \(shape \(0, 3, 5, 4, 3\)\)"):
        CalibrationMetric(3)(torch.softmax(x.detach(), 1)[:0], y[:0])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: t.clone().fill_(0.0).index_fill(1, torch.tensor([0]), 0.5), r"0/1 values, found \[0\.5\]"),
        (lambda t: t.clone().index_fill(1, torch.tensor([0]), 1.0), "more than one class at a voxel"),
        (lambda t: t.clone().index_fill(2, torch.tensor([0]), 0.0), r"no class \(all channels 0"),
    ],
)
def test_one_hot_targets_must_be_hard_one_hot(make, match, data):
    x, y = data
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    for call in (lambda t: NACLLoss(3)(x, t), lambda t: CalibrationMetric(3)(torch.softmax(x.detach(), 1), t)):
        with pytest.raises(ValueError, match=match):
            call(make(onehot))


def test_one_hot_targets_that_are_valid(data):
    x, y = data
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1)
    ref = NACLLoss(3)(x, y).item()
    assert NACLLoss(3)(x, onehot.bool()).item() == pytest.approx(ref)
    a, b = CalibrationMetric(3), CalibrationMetric(3)
    a(torch.softmax(x.detach(), 1), onehot.bool())
    b(torch.softmax(x.detach(), 1), y)
    assert a.aggregate() == b.aggregate()
    assert NACLLoss(3)(x, onehot.to(torch.uint8)).item() == pytest.approx(ref)
    # all-zero voxels are ignored when ignore_index is set
    padded = onehot.float().index_fill(2, torch.tensor([0]), 0.0)
    labels = y.clone()
    labels[:, :, 0] = 255
    assert NACLLoss(3, ignore_index=255)(x, padded).item() == pytest.approx(
        NACLLoss(3, ignore_index=255)(x, labels).item()
    )
