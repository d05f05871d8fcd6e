"""Split-conformal prediction sets, conformal risk control and volume intervals (monai_nacl.conformal).

Synthetic data are calibrated and exchangeable by construction: per voxel, probabilities from a Dirichlet model and
the label drawn from them. Coverage tolerances are 3 binomial standard deviations, from the calibration sample
(the conditional coverage of split conformal has variance about alpha (1 - alpha) / n) and the test sample.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from monai_nacl.conformal import (
    ConformalPredictionSets,
    ConformalRiskControl,
    ConformalVolumeIntervals,
    conformal_quantile,
    conformal_quantile_index,
)

C = 3
SHAPE = (6, 6, 6)


def _dirichlet_cases(n: int, seed: int, concentration: float = 0.6, shape=SHAPE, classes: int = C):
    """``n`` cases of i.i.d. voxels: p ~ Dirichlet(concentration), y ~ Categorical(p)."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((n, classes, *shape), concentration), generator=g)
    p = gamma / gamma.sum(1, keepdim=True)
    flat = p.movedim(1, -1).reshape(-1, classes)
    y = torch.multinomial(flat, 1, generator=g).reshape(n, 1, *shape)
    return p, y


def _structure_cases(n: int, seed: int, shape=(8, 8, 8)):
    """Two-class cases whose structure size varies per case: p_1 = sigmoid(a_i + 2 z), y ~ Bernoulli(p_1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 1, 1, 1, 1, generator=g) * 0.8 - 1.5
    z = torch.randn(n, 1, *shape, generator=g)
    p1 = torch.sigmoid(a + 2.0 * z)
    y = (torch.rand(n, 1, *shape, generator=g) < p1).long()
    return torch.cat([1 - p1, p1], 1), y


def _tolerance(alpha: float, n_cal: int, n_test: int) -> float:
    return 3 * math.sqrt(alpha * (1 - alpha) * (1 / n_cal + 1 / n_test))


# -- the quantile ---------------------------------------------------------------------------------------------
def test_quantile_index_by_hand():
    assert conformal_quantile_index(19, 0.1) == 18  # 20 * 0.9 = 18 exactly, not 19 through rounding
    assert conformal_quantile_index(9, 0.1) == 9
    assert conformal_quantile_index(4, 0.1) == 5  # > n: +inf
    assert conformal_quantile_index(10, 0.25) == 9  # ceil(8.25)
    assert conformal_quantile(torch.arange(1.0, 20.0), 0.1) == 18.0
    assert conformal_quantile(torch.tensor([0.4, 0.1, 0.3, 0.2]), 0.1) == math.inf
    assert conformal_quantile(torch.tensor([0.4, 0.1, 0.3, 0.2, 0.9, 0.5, 0.8, 0.7, 0.6, 0.0]), 0.25) == pytest.approx(
        0.8
    )


def test_prediction_sets_threshold_by_hand():
    # one 2-class volume of 10 voxels (spatial 10 x 1 x 1), label 1 everywhere: scores 1 - p_1.
    p1 = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], dtype=torch.float64)
    probs = torch.stack([1 - p1, p1]).view(1, 2, 10, 1, 1)
    sets = ConformalPredictionSets(num_classes=2)
    sets.update(probs, torch.ones(1, 1, 10, 1, 1, dtype=torch.long))
    q = sets.fit(0.25)  # ceil(11 * 0.75) = 9th smallest of {0.05, 0.1, ..., 0.8}: 0.7
    assert q == pytest.approx(0.7)
    mask = sets.predict(probs)
    assert torch.equal(mask[0, 1, :, 0, 0], 1 - p1 <= 0.7)
    assert sets.fit(0.05) == math.inf  # ceil(11 * 0.95) = 11 > 10
    assert bool(sets.predict(probs).all())


def test_aps_score_by_hand():
    from monai_nacl.conformal import _aps_scores

    p = torch.tensor([0.3, 0.5, 0.2]).view(1, 3, 1, 1, 1)
    scores = _aps_scores(p, torch.full((1, 1, 1, 1, 1), 0.5))
    assert torch.allclose(scores.flatten(), torch.tensor([0.5 + 0.15, 0.25, 0.8 + 0.1]))


# -- coverage -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_prediction_set_coverage(alpha, method):
    p_cal, y_cal = _dirichlet_cases(40, seed=1)
    p_test, y_test = _dirichlet_cases(40, seed=2)
    sets = ConformalPredictionSets(num_classes=C, method=method, voxels_per_volume=50, seed=0)
    for b in range(0, 40, 8):
        sets.update(p_cal[b : b + 8], y_cal[b : b + 8])
    assert sets.num_volumes == 40 and sets.calibration_scores().numel() == 2000
    sets.fit(alpha)
    mask = sets.predict(p_test)
    assert mask.shape == p_test.shape and mask.dtype == torch.bool
    covered = mask.gather(1, y_test).float()
    coverage, m = float(covered.mean()), covered.numel()
    tol = _tolerance(alpha, sets.n, m)
    print(f"{method} alpha={alpha}: coverage {coverage:.4f} (n={sets.n}, m={m}, tol {tol:.4f})")
    assert 1 - alpha - tol <= coverage <= 1 - alpha + 1 / (sets.n + 1) + tol
    # not trivially covered: sets are smaller than all classes
    assert float(mask.float().sum(1).mean()) < C - 0.5


def test_prediction_sets_sampling_is_bounded():
    p, y = _dirichlet_cases(10, seed=3)
    sets = ConformalPredictionSets(num_classes=C, voxels_per_volume=30, max_scores=200)
    sets.update(p, y)
    assert sets.calibration_scores().numel() == 200 and sets.num_volumes == 10


def test_prediction_sets_ignore_index_and_unbatched():
    p, y = _dirichlet_cases(2, seed=4)
    y[0, 0, 0] = 255
    sets = ConformalPredictionSets(num_classes=C, ignore_index=255)
    sets.update(p[0], y[0])  # C,*spatial with 1,*spatial
    assert sets.calibration_scores().numel() == 216 - 36
    sets.fit(0.1)
    assert sets.predict(p[0]).shape == p[0].shape


@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_risk_control_fnr_and_false_positives(alpha):
    p_cal, y_cal = _structure_cases(300, seed=5)
    p_test, y_test = _structure_cases(600, seed=6)
    crc = ConformalRiskControl(num_classes=2, bins=200)
    crc.update(p_cal, y_cal)
    t_in, t_out = crc.fit(alpha)
    inner, outer = crc.predict(p_test)
    true = y_test[:, 0] == 1
    size = true.flatten(1).sum(1).double()
    keep = size > 0
    fnr = ((true & ~outer[:, 1]).flatten(1).sum(1) / size)[keep]
    fpv = ((inner[:, 1] & ~true).flatten(1).sum(1) / size).clamp(max=1)[keep]
    n, m = crc.n[1], int(keep.sum())
    tol_fnr = 3 * float(fnr.std()) * math.sqrt(1 / n + 1 / m)
    tol_fpv = 3 * float(fpv.std()) * math.sqrt(1 / n + 1 / m)
    print(
        f"alpha={alpha}: t_out {float(t_out[1]):.3f} mean FNR {float(fnr.mean()):.4f} (tol {tol_fnr:.4f}); "
        f"t_in {float(t_in[1]):.3f} mean FP volume {float(fpv.mean()):.4f} (tol {tol_fpv:.4f}); n={n}, m={m}"
    )
    assert float(fnr.mean()) <= alpha + tol_fnr
    assert float(fpv.mean()) <= alpha + tol_fpv
    # the masks are informative: the outer mask is not everything, the inner mask not empty
    assert float(t_out[1]) > 0 and math.isfinite(float(t_in[1])) and float(t_in[1]) > float(t_out[1])
    assert float(fnr.mean()) > alpha / 3


def test_risk_control_exact_on_the_grid():
    # one case, 4 true voxels at p = 0.1, 0.4, 0.6, 0.9: FNR(t) steps by 1/4.  n = 1, alpha must allow
    # (1/2) FNR + 1/2 <= alpha -> alpha = 0.7 admits FNR <= 0.4, i.e. one voxel lost: t_out = 0.4.
    p1 = torch.tensor([0.1, 0.4, 0.6, 0.9, 0.05, 0.05], dtype=torch.float64)
    probs = torch.stack([1 - p1, p1]).view(1, 2, 6, 1, 1)
    y = torch.tensor([1, 1, 1, 1, 0, 0]).view(1, 1, 6, 1, 1)
    crc = ConformalRiskControl(num_classes=2, bins=10)
    crc.update(probs, y)
    _, t_out = crc.fit(0.7)
    assert float(t_out[1]) == pytest.approx(0.4)
    assert crc.fit(0.4)[1][1] == 0.0  # 1/(n+1) = 0.5 > alpha: too few cases, the whole volume
    assert crc.fit(0.4)[0][1] == math.inf  # and an empty inner mask


def test_risk_control_ignore_index_and_unbatched():
    p, y = _structure_cases(3, seed=11)
    y2 = y.clone()
    y2[:, :, :2] = 7  # ignored: as if those voxels were absent
    a = ConformalRiskControl(2, bins=50, ignore_index=7)
    b = ConformalRiskControl(2, bins=50)
    for i in range(3):
        a.update(p[i], y2[i])  # C,*spatial with 1,*spatial
        b.update(p[i : i + 1, :, 2:], y[i : i + 1, :, 2:])
    assert torch.allclose(a._fnr_sum, b._fnr_sum) and torch.allclose(a._fpv_sum, b._fpv_sum)
    a.fit(0.3)
    inner, outer = a.predict(p[0])
    assert inner.shape == outer.shape == p[0].shape
    vol = ConformalVolumeIntervals(2)
    vol.update(p[0], y[0])
    vol.fit(0.5)
    low, high = vol.predict(p[0])
    assert low.shape == high.shape == (2,)


def test_volume_interval_coverage():
    p_cal, y_cal = _structure_cases(300, seed=7)
    p_test, y_test = _structure_cases(800, seed=8)
    spacing = (1.0, 1.0, 2.0)
    for alpha in (0.1, 0.05):
        vol = ConformalVolumeIntervals(num_classes=2, class_names=["background", "structure"])
        vol.update(p_cal[:150], y_cal[:150], spacing=spacing)
        vol.update(p_cal[150:], y_cal[150:], spacing=torch.tensor([spacing] * 150))
        vol.fit(alpha)
        low, high = vol.predict(p_test, spacing=spacing)
        true = (y_test == 1).flatten(1).sum(1).double() * 2e-3
        covered = ((low[:, 1] <= true) & (true <= high[:, 1])).double()
        tol = _tolerance(alpha, vol.n, covered.numel())
        width = float((high[:, 1] - low[:, 1]).mean())
        print(f"volume alpha={alpha}: coverage {float(covered.mean()):.4f} (tol {tol:.4f}), mean width {width:.3f} mL")
        assert 1 - alpha - tol <= float(covered.mean()) <= 1 - alpha + 1 / (vol.n + 1) + tol
        assert bool((low >= 0).all()) and width < float(true.mean())


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ConformalPredictionSets, ConformalRiskControl, ConformalVolumeIntervals])
def test_bad_input(cls):
    p, y = _dirichlet_cases(2, seed=9)
    obj = cls(num_classes=C)
    with pytest.raises(ValueError, match="empty"):
        obj.fit(0.1)
    with pytest.raises(ValueError, match="not fitted"):
        obj.predict(p)
    with pytest.raises(ValueError, match="classes"):
        obj.update(p[:, :2] / p[:, :2].sum(1, keepdim=True), y.clamp(max=1))
    with pytest.raises(ValueError, match="probabilities"):
        obj.update(torch.randn_like(p), y)
    with pytest.raises(ValueError, match="probs must be"):
        obj.update(p[:, :, 0, 0], y)
    with pytest.raises(ValueError, match="label values"):
        obj.update(p, y + 5)
    obj.update(p, y)
    for alpha in (0, 1, 1.5, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="alpha"):
            obj.fit(alpha)
    obj.fit(0.5)
    with pytest.raises(ValueError, match="num_classes=3"):
        obj.predict(torch.full((1, 4, *SHAPE), 0.25))
    with pytest.raises(ValueError, match="NaN"):
        obj.predict(torch.full_like(p, float("nan")))


def test_bad_options():
    with pytest.raises(ValueError, match="method"):
        ConformalPredictionSets(3, method="raps")
    with pytest.raises(ValueError, match="class_names"):
        ConformalRiskControl(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="scale"):
        ConformalVolumeIntervals(3, scale="iqr")
    with pytest.raises(ValueError, match="spacing"):
        vol = ConformalVolumeIntervals(2)
        vol.update(*_structure_cases(2, seed=0), spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="num_classes"):
        ConformalPredictionSets(1)


# -- storage ------------------------------------------------------------------------------------------------
def test_json_and_state_dict_round_trip(tmp_path):
    p, y = _dirichlet_cases(12, seed=10)
    names = ["background", "anterior", "posterior"]
    objects = [
        ConformalPredictionSets(C, class_names=names),
        ConformalPredictionSets(C, method="aps"),
        ConformalRiskControl(C, class_names=names, bins=100),
        ConformalVolumeIntervals(C, class_names=names),
    ]
    for obj in objects:
        obj.update(p, y)
        obj.fit(0.1)
        text = obj.to_json()
        state = json.loads(text)
        assert state["alpha"] == 0.1 and state["num_classes"] == C and state["class_names"] == obj.class_names
        assert "n" in state
        back = type(obj).from_json(text)
        a, b = obj.predict(p), back.predict(p)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v)
        torch.save(obj.state_dict(), tmp_path / "conformal.pt")
        fresh = type(obj)(C)
        fresh.load_state_dict(torch.load(tmp_path / "conformal.pt", weights_only=True))
        assert fresh.to_json() == text
    # +inf survives JSON (as the string "inf")
    tiny = ConformalPredictionSets(C)
    tiny.update(p[:1, :, :1, :1, :2], y[:1, :, :1, :1, :2])
    assert tiny.fit(0.1) == math.inf
    assert json.loads(tiny.to_json())["threshold"] == "inf"
    assert ConformalPredictionSets.from_json(tiny.to_json()).threshold == math.inf
    with pytest.raises(ValueError, match="risk_control"):
        ConformalPredictionSets.from_json(objects[2].to_json())
    with pytest.raises(ValueError, match="num_classes"):
        ConformalRiskControl(2).load_state_dict(objects[2].state_dict())
