from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_prior
from monai.data import MetaTensor
from monai.losses import DiceLoss
from monai.losses import NACLLoss as MonaiNACLLoss

from monai_nacl.losses import NACLLoss


def _data(shape, c, rng, dtype=torch.float64):
    x = torch.randn((shape[0], c, *shape[1:]), generator=rng, dtype=dtype, requires_grad=True)
    y = torch.randint(0, c, (shape[0], 1, *shape[1:]), generator=rng)
    return x, y


def test_hand_computed_single_voxel():
    # one voxel: τ = one-hot of its own label for every padding mode
    x = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1, 1)
    y = torch.tensor([2]).view(1, 1, 1, 1, 1)
    lse = math.log(math.exp(2.0) + math.exp(-1.0) + math.exp(0.5))
    ce = lse - 0.5
    pen = (abs(0 - 2.0) + abs(0 + 1.0) + abs(1 - 0.5)) / 3
    loss_fn = NACLLoss(3, alpha=0.1)
    assert loss_fn(x, y).item() == pytest.approx(ce + 0.1 * pen, rel=1e-6)
    assert loss_fn.last_components["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert loss_fn.last_components["penalty"].item() == pytest.approx(pen, rel=1e-6)
    l2 = NACLLoss(3, alpha=0.5, distance="l2")(x, y).item()
    assert l2 == pytest.approx(ce + 0.5 * (4.0 + 1.0 + 0.25) / 3, rel=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_equals_monai_nacl_value_and_gradient(dims, kernel_size, rng):
    shape = (2,) + (7, 8, 6)[:dims]
    x, y = _data(shape, 4, rng)
    ours = NACLLoss(4, spatial_dims=dims, kernel_size=kernel_size, padding="zeros")(x, y)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref = MonaiNACLLoss(4, dims, kernel_size=kernel_size)(x, y[:, 0])
    (g_ref,) = torch.autograd.grad(ref, x)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"penalty_on": "softmax"},
        {"distance": "l2", "kernel": "gaussian"},
        {"ignore_index": 9, "weight": [0.5, 2.0, 1.0]},
        {"ignore_index": 9, "penalty_on": "softmax", "distance": "l2", "padding": "background"},
        {"base": "dice_ce", "ignore_index": 9},
        {"reduction": "sum", "weight": [1.0, 3.0, 2.0]},
        {"reduction": "none", "ignore_index": 9, "kernel_size": (3, 1, 3)},
    ],
)
def test_gradcheck_float64(kwargs, rng):
    x, y = _data((2, 4, 3, 5), 3, rng)
    if "ignore_index" in kwargs:
        y[0, 0, 1, 1] = 9
    loss_fn = NACLLoss(3, **kwargs)
    assert torch.autograd.gradcheck(lambda a: loss_fn(a, y), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", ["mean", "gaussian"])
def test_precomputed_prior_equals_on_the_fly(kernel, rng):
    x, y = _data((2, 6, 5, 4), 3, rng)
    loss_fn = NACLLoss(3, kernel=kernel)
    a = loss_fn(x, y)
    prior = reference_prior(y, 3, kernel)
    b = loss_fn(x, y, prior=prior)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_target_layouts_and_metatensor_agree(rng):
    x, y = _data((2, 5, 4, 6), 3, rng)
    loss_fn = NACLLoss(3)
    ref = loss_fn(x, y).item()
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1).double()
    assert loss_fn(x, y[:, 0]).item() == pytest.approx(ref)
    assert loss_fn(x, onehot).item() == pytest.approx(ref)
    assert loss_fn(x, y.float()).item() == pytest.approx(ref)
    assert loss_fn(MetaTensor(x), MetaTensor(y.float())).item() == pytest.approx(ref)


def test_alpha_zero_is_weighted_cross_entropy(rng):
    x, y = _data((2, 5, 4, 6), 3, rng)
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    y[0, 0, 0] = 255
    ours = NACLLoss(3, alpha=0.0, weight=w, ignore_index=255)(x, y)
    ref = F.cross_entropy(x, y[:, 0], weight=w, ignore_index=255)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def test_ignore_index_excludes_voxels_from_loss_and_neighbourhoods(rng):
    x, y = _data((1, 6, 6, 6), 3, rng)
    y[0, 0, :, :, :2] = 255
    loss_fn = NACLLoss(3, ignore_index=255)
    loss = loss_fn(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.all(g[..., :2] == 0)
    # changing logits at ignored voxels changes nothing
    x2 = x.detach().clone()
    x2[..., :2] = 100.0
    assert loss_fn(x2, y).item() == pytest.approx(loss.item())
    # same as the loss on the valid part alone, where the ignored slab plays the role of replicate padding
    # only if its neighbours are renormalised: compare with the brute-force renormalised prior
    tau = reference_prior(y, 3, ignore_index=255)
    valid = (y != 255).double()
    logp = F.log_softmax(x, 1)
    ce = -(logp.gather(1, torch.where(y == 255, 0, y)) * valid).sum() / valid.sum()
    pen = ((tau - x).abs() * valid).sum() / (valid.sum() * 3)
    assert loss.item() == pytest.approx((ce + 0.1 * pen).item(), rel=1e-6)


def test_dice_ce_base_is_monai_dice_plus_ce(rng):
    x, y = _data((2, 5, 4, 6), 3, rng)
    loss_fn = NACLLoss(3, base="dice_ce", alpha=0.3)
    total = loss_fn(x, y)
    dice = DiceLoss(to_onehot_y=True, softmax=True)(x, y)
    ce = F.cross_entropy(x, y[:, 0])
    assert loss_fn.last_components["dice"].item() == pytest.approx(dice.item(), rel=1e-6)
    assert total.item() == pytest.approx((ce + dice + 0.3 * loss_fn.last_components["penalty"]).item(), rel=1e-6)


def test_reductions_are_consistent(rng):
    x, y = _data((2, 5, 4, 6), 3, rng)
    y[1, 0, 0] = 255
    n_valid = (y != 255).sum().item()
    mean = NACLLoss(3, ignore_index=255)(x, y).item()
    total = NACLLoss(3, ignore_index=255, reduction="sum")
    s = total(x, y).item()
    vmap = NACLLoss(3, ignore_index=255, reduction="none")(x, y)
    assert vmap.shape == (2, 1, 5, 4, 6)
    assert vmap.sum().item() / n_valid == pytest.approx(mean, rel=1e-6)
    assert s == pytest.approx(total.last_components["ce"].item() + 0.1 * total.last_components["penalty"].item())


def test_transform_prior_then_crop_equals_on_the_fly_inside_patch(rng):
    from monai_nacl.transforms import NeighborPrior

    y = torch.randint(0, 3, (1, 20, 18, 16), generator=rng)
    full = NeighborPrior(3)(y)
    sl = (slice(None), slice(4, 14), slice(3, 13), slice(2, 12))
    patch_label = y[sl][None]
    on_the_fly = NACLLoss(3).prior(patch_label)[0]
    cropped = full[sl]
    interior = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(cropped[interior], on_the_fly[interior])
    edge = torch.ones(10, 10, 10, dtype=torch.bool)
    edge[1:-1, 1:-1, 1:-1] = False
    assert not torch.allclose(cropped[:, edge], on_the_fly[:, edge])


def test_half_precision_logits_keep_dtype(rng):
    x = torch.randn(1, 3, 6, 6, 6, generator=rng).bfloat16().requires_grad_()
    y = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=rng)
    NACLLoss(3)(x, y).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y: (x[:, :2], y, None), "channels"),
        (lambda x, y: (x, y[..., :3], None), "does not match input shape"),
        (lambda x, y: (x, y + 3, None), r"label values \[3, 4, 5\] outside \[0, 3\)"),
        (lambda x, y: (x, y - 1, None), "outside"),
        (lambda x, y: (x, y, torch.zeros(1, 3, 4, 4, 3)), "prior shape"),
        (lambda x, y: (x, torch.zeros(1, 2, 4, 4, 4), None), "expected 1 .labels. or 3"),
        (lambda x, y: (x[0], y[0], None), "spatial dims"),
        (lambda x, y: (x.detach().index_fill(2, torch.tensor([0]), float("nan")), y, None), "non-finite"),
        (lambda x, y: (x.detach().index_fill(2, torch.tensor([0]), float("-inf")), y, None), "non-finite"),
    ],
)
def test_bad_input_raises_named_error(make, match, rng):
    x, y = _data((1, 4, 4, 4), 3, rng, torch.float32)
    inp, tgt, prior = make(x, y)
    with pytest.raises(ValueError, match=match):
        NACLLoss(3)(inp, tgt, prior=prior)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_size": 4}, "odd"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"kernel": "box"}, "kernel"),
        ({"padding": "reflect"}, "padding"),
        ({"distance": "l3"}, "distance"),
        ({"base": "focal"}, "base"),
        ({"weight": [1.0, 2.0]}, "weight"),
        ({"reduction": "none", "base": "dice_ce"}, "none"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NACLLoss(3, **kwargs)


def test_monai_rejects_what_we_accept(rng):
    """Documents the MONAI limitation we fix: B,1,... labels."""
    x, y = _data((1, 4, 4, 4), 3, rng)
    with pytest.raises(RuntimeError, match="target size"):
        MonaiNACLLoss(3, 3)(x, y)
    assert torch.isfinite(NACLLoss(3)(x, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device not present on this machine")
def test_cuda_matches_cpu(rng):
    x, y = _data((2, 8, 8, 8), 4, rng, torch.float32)
    loss_fn = NACLLoss(4, kernel="gaussian", ignore_index=7)
    cpu = loss_fn(x, y)
    xc = x.detach().cuda().requires_grad_()
    gpu = loss_fn(xc, y.cuda())
    gpu.backward()
    (g,) = torch.autograd.grad(cpu, x)
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-5)
    torch.testing.assert_close(xc.grad.cpu(), g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- per-class penalty weights (class-adaptive NACL)


def _weighted_reference(x, y, lam, distance="l1", penalty_on="logits", reduction="mean", ignore_index=None, w=None):
    """Plain-autograd definition: CE (class weights, ignore index) + sum_i sum_c lam_c d(tau_ic, z_ic) / (N C)."""
    c = x.shape[1]
    valid = torch.ones_like(y, dtype=x.dtype) if ignore_index is None else (y != ignore_index).to(x.dtype)
    index = torch.where(valid.bool(), y, torch.zeros_like(y))
    tau = reference_prior(y, c, ignore_index=ignore_index).to(x.dtype)
    cw = torch.ones(c, dtype=x.dtype) if w is None else torch.as_tensor(w, dtype=x.dtype)
    vw = cw[index] * valid
    ce_vox = -F.log_softmax(x, 1).gather(1, index)
    z = F.softmax(x, 1) if penalty_on == "softmax" else x
    d = (z - tau).abs() if distance == "l1" else (z - tau).square()
    lam = torch.as_tensor(lam, dtype=x.dtype).view(1, c, *([1] * (x.ndim - 2)))
    weighted = (lam * d * valid).sum()
    if reduction == "sum":
        return (ce_vox * vw).sum() + weighted
    return (ce_vox * vw).sum() / vw.sum() + weighted / (valid.sum() * c)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"penalty_on": "softmax"},
        {"distance": "l2"},
        {"reduction": "sum", "weight": [1.0, 3.0, 2.0]},
        {"ignore_index": 9, "penalty_on": "softmax", "distance": "l2"},
        {"ignore_index": 9, "weight": [0.5, 2.0, 1.0]},
    ],
)
def test_per_class_weights_match_brute_force_value_and_gradient(kwargs, rng):
    x, y = _data((2, 5, 4, 3), 3, rng)
    if "ignore_index" in kwargs:
        y[0, 0, 1, 1] = 9
    lam = [0.05, 0.7, 2.5]
    loss_fn = NACLLoss(3, alpha=123.0, penalty_weight=lam, **kwargs)  # alpha is not used while weights are set
    tau = reference_prior(y, 3, ignore_index=kwargs.get("ignore_index"))  # float64 (the loss's own τ is float32)
    ours = loss_fn(x, y, prior=tau)
    (g_ours,) = torch.autograd.grad(ours, x)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "weight"}
    ref = _weighted_reference(x, y, lam, w=kwargs.get("weight"), **ref_kwargs)
    (g_ref,) = torch.autograd.grad(ref, x)
    # with an ignore index the loss folds validity into float32 CE weights: float32 rounding (as for a scalar alpha)
    rel = 1e-7 if "ignore_index" in kwargs else 1e-10
    assert ours.item() == pytest.approx(ref.item(), rel=rel)
    torch.testing.assert_close(g_ours, g_ref, rtol=rel * 10, atol=rel * 1e-2)
    # "penalty" stays the unweighted mean, as with a scalar alpha
    unweighted = NACLLoss(3, alpha=0.0, **kwargs)
    unweighted(x, y, prior=tau)
    assert loss_fn.last_components["penalty"].item() == pytest.approx(
        unweighted.last_components["penalty"].item(), rel=1e-12
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"penalty_on": "softmax", "distance": "l2"},
        {"reduction": "sum", "ignore_index": 9},
        {"reduction": "none", "ignore_index": 9},
        {"base": "dice_ce", "kernel": "gaussian"},
    ],
)
def test_per_class_weights_equal_to_alpha_reproduce_the_scalar_loss(kwargs, rng):
    x, y = _data((2, 6, 5, 4), 3, rng)
    if "ignore_index" in kwargs:
        y[1, 0, 2] = 9
    scalar = NACLLoss(3, alpha=0.3, **kwargs)
    per_class = NACLLoss(3, alpha=0.3, penalty_weight=[0.3, 0.3, 0.3], **kwargs)
    a, b = scalar(x, y), per_class(x, y)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(gb, ga, rtol=1e-13, atol=1e-15)
    # and a different weight vector does change it (the test can fail)
    per_class.penalty_weight = [0.3, 0.3, 0.9]
    assert not torch.allclose(per_class(x, y), a)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"penalty_on": "softmax"},
        {"distance": "l2", "kernel": "gaussian"},
        {"ignore_index": 9, "weight": [0.5, 2.0, 1.0]},
        {"ignore_index": 9, "penalty_on": "softmax", "distance": "l2"},
        {"reduction": "sum"},
        {"reduction": "none", "ignore_index": 9},
    ],
)
def test_per_class_weights_gradcheck_float64(kwargs, rng):
    x, y = _data((2, 4, 3, 5), 3, rng)
    if "ignore_index" in kwargs:
        y[0, 0, 1, 1] = 9
    loss_fn = NACLLoss(3, penalty_weight=[0.0, 0.4, 1.7], **kwargs)
    assert torch.autograd.gradcheck(lambda a: loss_fn(a, y), (x,), eps=1e-6, atol=1e-6)


def test_fused_function_per_class_gradcheck_float64(rng):
    from monai_nacl.losses.fused import fused_ce_penalty

    x, y = _data((2, 3, 4, 2), 4, rng)
    tau = reference_prior(y, 4)
    lam = torch.tensor([0.3, 0.0, 1.2, 0.6], dtype=torch.float64)
    for distance in ("l1", "l2"):
        for on_softmax in (False, True):

            def f(a, distance=distance, on_softmax=on_softmax):
                return fused_ce_penalty(a, y, tau, 1.0 / y.numel(), None, 0.01, lam, distance, on_softmax)[0]

            assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_penalty_weight_setter_validates_and_can_change_between_steps(rng):
    x, y = _data((1, 4, 4, 4), 3, rng)
    net = torch.nn.Conv3d(3, 3, 1).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = NACLLoss(3, alpha=0.2)
    assert loss_fn.penalty_weight is None and "_penalty_weight" not in loss_fn.state_dict()
    values = []
    for lam in (None, [0.2, 0.2, 0.2], [0.0, 0.0, 5.0]):
        loss_fn.penalty_weight = lam
        with torch.no_grad():
            values.append(loss_fn(net(x), y).item())
        opt.zero_grad()
        loss_fn(net(x), y).backward()  # the same optimizer keeps working: no parameter was added
        assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in net.parameters()}
    assert loss_fn.penalty_weight.dtype == torch.float64
    assert loss_fn.state_dict()["_penalty_weight"].tolist() == [0.0, 0.0, 5.0]
    assert values[2] > values[1]  # a much larger weight on one class raises the loss
    loss_fn.penalty_weight = None
    assert loss_fn.penalty_weight is None
    loss_fn.penalty_weight = torch.zeros(3)  # all zero is allowed: no penalty at all
    ce_only = NACLLoss(3, alpha=0.0)
    assert loss_fn(x, y).item() == pytest.approx(ce_only(x, y).item(), rel=1e-12)
    source = [0.1, 0.2, 0.3]
    loss_fn.penalty_weight = source
    source[0] = 9.0
    assert loss_fn.penalty_weight.tolist() == [0.1, 0.2, 0.3]  # a copy


@pytest.mark.parametrize(
    "value, match",
    [
        ([0.1, 0.2], "3 values"),
        ([0.1, -0.2, 0.3], ">= 0"),
        ([0.1, float("nan"), 0.3], "finite"),
        ([0.1, float("inf"), 0.3], "finite"),
        ("0.1", "real numbers"),
        ([True, False, True], "real numbers"),
        ([[0.1, 0.2], [0.3, 0.4]], "3 values"),
        ({"a": 1}, "real numbers"),
    ],
)
def test_penalty_weight_bad_values(value, match):
    with pytest.raises(ValueError, match=f"penalty_weight.*{match}"):
        NACLLoss(3, penalty_weight=value)
    loss_fn = NACLLoss(3)
    with pytest.raises(ValueError, match="penalty_weight"):
        loss_fn.penalty_weight = value
    assert loss_fn.penalty_weight is None  # a rejected value leaves the loss as it was


def test_penalty_weight_changed_in_place_to_nan_is_named(rng):
    x, y = _data((1, 4, 4, 4), 3, rng)
    loss_fn = NACLLoss(3, penalty_weight=[0.1, 0.1, 0.1])
    loss_fn.penalty_weight[1] = float("nan")
    with pytest.raises(ValueError, match="penalty_weight contains NaN"):
        loss_fn(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device not present on this machine")
def test_cuda_per_class_weights_match_cpu(rng):
    x, y = _data((2, 8, 8, 8), 4, rng, torch.float32)
    loss_fn = NACLLoss(4, ignore_index=7, penalty_weight=[0.05, 0.2, 0.4, 1.0])
    cpu = loss_fn(x, y)
    (g,) = torch.autograd.grad(cpu, x)
    loss_fn.cuda()
    assert loss_fn.penalty_weight.is_cuda
    xc = x.detach().cuda().requires_grad_()
    gpu = loss_fn(xc, y.cuda())
    gpu.backward()
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-5)
    torch.testing.assert_close(xc.grad.cpu(), g, rtol=1e-4, atol=1e-6)
