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
    case_conformal_quantile,
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
    # ten 2-class cases of one voxel each, label 1: scores 1 - p_1, the usual split-conformal quantile.
    p1 = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], dtype=torch.float64)
    probs = torch.stack([1 - p1, p1], 1).view(10, 2, 1, 1, 1)
    labels = torch.ones(10, 1, 1, 1, 1, dtype=torch.long)
    sets = ConformalPredictionSets(num_classes=2)
    sets.update(probs, labels)
    q = sets.fit(0.25)  # ceil(11 * 0.75) = 9th smallest of {0.05, 0.1, ..., 0.8}: 0.7
    assert q == pytest.approx(0.7) and sets.n == 10 and sets.num_scores == 10
    mask = sets.predict(probs)
    assert torch.equal(mask[:, 1, 0, 0, 0], 1 - p1 <= 0.7)
    assert sets.fit(0.05) == math.inf  # ceil(11 * 0.95) = 11 > 10
    assert bool(sets.predict(probs).all())
    # the same ten voxels as ONE case: the rank counts cases, so n = 1 is too few for alpha 0.25
    one = ConformalPredictionSets(num_classes=2)
    one.update(probs.permute(1, 0, 2, 3, 4)[None, :, :, 0], labels.permute(1, 0, 2, 3, 4)[None, :, :, 0])
    assert one.num_volumes == 1 and one.fit(0.25) == math.inf and one.n == 1 and one.num_scores == 10


def test_case_quantile_by_hand():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(37, generator=g, dtype=torch.float64)
    for alpha in (0.1, 0.05, 0.3):  # one score per case: the usual rank
        assert case_conformal_quantile(list(scores[:, None]), alpha) == conformal_quantile(scores, alpha)
    # 0.1 and 0.3 weigh 1/2 (case of two scores): cumulative 0.5, 1.5, 2, 3, 4 reaches (4 + 1)(1 - 0.4) = 3 at 0.4
    cases = [torch.tensor([0.1, 0.3]), torch.tensor([0.2]), torch.tensor([0.4]), torch.tensor([0.5])]
    cases = [c.double() for c in cases]
    assert case_conformal_quantile(cases, 0.4) == pytest.approx(0.4)
    assert case_conformal_quantile(cases, 0.6) == pytest.approx(0.3)  # (4 + 1)(1 - 0.6) = 2: cumulative 2 at 0.3
    # nine cases at alpha 0.1: (9 + 1) 0.9 = 9 = n, so every voxel of every case must be covered: the maximum
    nine = [torch.rand(50, generator=g, dtype=torch.float64) for _ in range(9)]
    assert case_conformal_quantile(nine, 0.1) == float(torch.cat(nine).max())
    assert case_conformal_quantile(nine[:8], 0.1) == math.inf  # (8 + 1) 0.9 = 8.1 > 8
    with pytest.raises(ValueError, match="empty"):
        case_conformal_quantile([], 0.1)
    with pytest.raises(ValueError, match="case 1 has no"):
        case_conformal_quantile([torch.ones(2), torch.ones(0)], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        case_conformal_quantile([torch.tensor([math.nan])] * 30, 0.1)


def test_aps_score_by_hand():
    from monai_nacl.conformal.methods import _aps_scores

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
    assert sets.n == 40 and sets.num_scores == 2000  # the rank counts the 40 cases
    mask = sets.predict(p_test)
    assert mask.shape == p_test.shape and mask.dtype == torch.bool
    assert bool((mask.sum(1) >= 1).all())  # never empty
    covered = mask.gather(1, y_test).float()
    coverage, m = float(covered.mean()), covered.numel()
    # voxels are i.i.d. across cases here, so the sampling error is that of the voxels; the case-level correction
    # targets a calibration mean of (n + 1)(1 - alpha) / n, at most 1/(n + 1) above 1 - alpha
    tol = _tolerance(alpha, sets.num_scores, m)
    print(f"{method} alpha={alpha}: coverage {coverage:.4f} (n={sets.n} cases, m={m}, tol {tol:.4f})")
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
        for key in type(obj)._tensor_keys:  # float64 survives JSON exactly
            assert getattr(back, key).dtype == torch.float64 and torch.equal(getattr(back, key), getattr(obj, key))
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


def test_prediction_sets_never_empty():
    # confident calibration cases give a tiny q; uncertain test voxels then score above q for every class, and the
    # set falls back to the argmax class alone
    p_cal = torch.full((30, 3, 2, 2, 2), 0.005, dtype=torch.float64)
    p_cal[:, 1] = 0.99
    y_cal = torch.ones(30, 1, 2, 2, 2, dtype=torch.long)
    p_test = torch.softmax(torch.randn(4, 3, 3, 3, 3, generator=torch.Generator().manual_seed(0)), 1)
    for method in ("lac", "aps"):
        sets = ConformalPredictionSets(3, method=method)
        sets.update(p_cal, y_cal)
        q = sets.fit(0.1)
        raw = sets.scores(p_test, torch.Generator().manual_seed(sets.seed)) <= q
        if method == "lac":  # q = 0.01: without the fallback some sets would be empty
            assert bool((raw.sum(1) == 0).any())
        mask = sets.predict(p_test)
        assert bool((mask.sum(1) >= 1).all())
        argmax = torch.nn.functional.one_hot(p_test.argmax(1), 3).movedim(-1, 1).bool()
        assert torch.equal(mask, raw | argmax)


def test_prediction_sets_case_level_guarantee():
    """Cases differ (per-case miscalibration), so voxels are exchangeable only within a case. Over many random
    calibration sets of 19 cases, the mean per-case coverage of a new case is still >= 1 - alpha."""
    g = torch.Generator().manual_seed(12)
    alpha, n_cal, reps = 0.1, 19, 150
    coverage = []
    for _ in range(reps):
        gamma = torch._standard_gamma(torch.full((n_cal + 1, C, 5, 5, 5), 0.6), generator=g)
        p = gamma / gamma.sum(1, keepdim=True)
        # labels from a per-case tempered version of p: some cases over-, some under-confident
        t = torch.exp(torch.randn(n_cal + 1, 1, 1, 1, 1, generator=g))
        q = torch.softmax(torch.log(p.clamp_min(1e-12)) / t, 1)
        y = torch.multinomial(q.movedim(1, -1).reshape(-1, C), 1, generator=g).reshape(n_cal + 1, 1, 5, 5, 5)
        sets = ConformalPredictionSets(C, voxels_per_volume=125)
        sets.update(p[:n_cal], y[:n_cal])
        sets.fit(alpha)
        coverage.append(float(sets.predict(p[n_cal:]).gather(1, y[n_cal:]).float().mean()))
    mean = sum(coverage) / reps
    se = float(torch.tensor(coverage).std()) / math.sqrt(reps)
    print(f"mean per-case coverage {mean:.4f} (se {se:.4f})")
    assert mean >= 1 - alpha - 3 * se
    assert mean <= 1 - alpha + 1 / (n_cal + 1) + 0.03 + 3 * se  # not trivially everything (argmax adds a little)


# -- the record beside the weights ---------------------------------------------------------------------------
def _tiny_network(seed: int = 0):
    from monai_nacl.temperature import TemperatureScaled

    torch.manual_seed(seed)
    net = TemperatureScaled(torch.nn.Conv3d(1, C, 3, padding=1), foreground_margin=1)
    net.set_temperature(torch.tensor([0.8, 1.6]))
    return net.eval()


def _fitted(alpha: float = 0.2):
    p, y = _dirichlet_cases(12, seed=13)
    crc = ConformalRiskControl(C, bins=100, class_names=["background", "anterior", "posterior"])
    vol = ConformalVolumeIntervals(C, class_names=["background", "anterior", "posterior"])
    crc.update(p, y)
    vol.update(p, y)
    crc.fit(alpha)
    vol.fit(alpha)
    return p, crc, vol


def test_conformal_record_round_trip_and_staleness(tmp_path):
    from monai_nacl.conformal import (
        StaleConformalWarning,
        check_conformal_record,
        conformal_record_path,
        load_conformal,
        read_conformal_record,
        save_conformal,
        warn_if_conformal_stale,
    )
    from monai_nacl.temperature import save_calibrated, weights_fingerprint

    net = _tiny_network()
    weights = tmp_path / "models" / "model.pt"
    save_calibrated(net.state_dict(), weights)
    p, crc, vol = _fitted(0.2)
    _, crc2, _ = _fitted(0.1)
    assert read_conformal_record(weights) is None
    assert check_conformal_record(weights) == [f"{conformal_record_path(weights)}: missing"]
    record = save_conformal(
        weights, [crc, vol, crc2], weights_fingerprint(net), net.temperature, data="synthetic", cases=12
    )
    path = conformal_record_path(weights)
    assert path == tmp_path / "models" / "model.conformal.json" and path.is_file()
    on_disk = read_conformal_record(weights)
    assert on_disk == record == read_conformal_record(path)
    assert record["weights"] == "model.pt" and record["alphas"] == [0.2, 0.1] and record["data"] == "synthetic"
    assert record["weights_fingerprint"] == f"{weights_fingerprint(net):016x}"
    assert record["temperature"] == pytest.approx([0.8, 1.6])
    assert record["class_names"] == ["background", "anterior", "posterior"] and record["num_classes"] == C
    assert check_conformal_record(weights) == []
    for fitted, kind, alpha in (
        (crc, "risk_control", 0.2),
        (crc2, "risk_control", 0.1),
        (vol, "volume_intervals", None),
    ):
        back = load_conformal(weights, kind, alpha)
        a, b = fitted.predict(p), back.predict(p)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    with pytest.raises(ValueError, match=r"2 'risk_control' fits \(alpha \[0.2, 0.1\]\)"):
        load_conformal(weights, "risk_control")
    with pytest.raises(ValueError, match=r"no 'risk_control' fit for alpha=0.05; it has alpha \[0.2, 0.1\]"):
        load_conformal(weights, "risk_control", 0.05)
    with pytest.raises(ValueError, match="kind must be"):
        load_conformal(weights, "sets", 0.1)
    with pytest.raises(FileNotFoundError, match="calibrate.json"):
        load_conformal(tmp_path / "other.pt", "risk_control", 0.1)

    # new weights (fine-tuned) written beside the old record without save_calibrated: the record is stale
    with torch.no_grad():
        net.network.weight.add_(0.01)
    net.set_temperature(torch.tensor([0.8, 1.6]))
    torch.save(net.state_dict(), weights)
    problems = check_conformal_record(weights)
    assert len(problems) == 1 and "fitted for weights" in problems[0]
    with pytest.warns(StaleConformalWarning, match="fitted for weights"):
        assert warn_if_conformal_stale(weights) == problems
    with pytest.raises(ValueError, match="does not belong to these weights"):
        warn_if_conformal_stale(weights, strict=True)
    # a stale record is never written: old fingerprint, or another temperature than the file holds
    old = record["weights_fingerprint"]
    with pytest.raises(ValueError, match="stale record is not written"):
        save_conformal(weights, [crc], old, net.temperature)
    with pytest.raises(ValueError, match="temperature"):
        save_conformal(weights, [crc], weights_fingerprint(net), [1.0, 1.0])
    assert read_conformal_record(weights)["weights_fingerprint"] == old  # untouched
    save_conformal(weights, [crc], weights_fingerprint(net), net.temperature)
    assert check_conformal_record(weights) == []
    # another temperature written into the weights later
    net.set_temperature(torch.tensor([1.1, 1.2]))
    torch.save(net.state_dict(), weights)
    assert ["temperature" in x for x in check_conformal_record(weights)] == [True]


def test_save_conformal_bad_arguments(tmp_path):
    from monai_nacl.conformal import read_conformal_record, save_conformal
    from monai_nacl.temperature import save_calibrated, weights_fingerprint

    net = _tiny_network()
    weights = tmp_path / "model.pt"
    _, crc, vol = _fitted()
    fp = weights_fingerprint(net)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        save_conformal(weights, [crc], fp)
    save_calibrated(net.state_dict(), weights)
    for bad in (0, -1, "xyz", "0" * 16, 1.5, None, True):
        with pytest.raises(ValueError, match="weights_fingerprint"):
            save_conformal(weights, [crc], bad)
    with pytest.raises(ValueError, match="non-empty sequence"):
        save_conformal(weights, [], fp)
    with pytest.raises(ValueError, match="non-empty sequence"):
        save_conformal(weights, crc, fp)
    with pytest.raises(ValueError, match="not fitted"):
        save_conformal(weights, [ConformalRiskControl(C)], fp)
    with pytest.raises(ValueError, match="two 'risk_control' objects"):
        save_conformal(weights, [crc, crc], fp)
    with pytest.raises(ValueError, match="class counts"):
        two = ConformalVolumeIntervals(2)
        two.update(*_structure_cases(3, seed=1))
        two.fit(0.5)
        save_conformal(weights, [crc, two], fp)
    with pytest.raises(ValueError, match="record's own keys"):
        save_conformal(weights, [crc], fp, fits=[])
    with pytest.raises(ValueError, match="temperature must be positive"):
        save_conformal(weights, [crc], fp, temperature=[0.0])
    assert read_conformal_record(weights) is None  # nothing written by a refused call
    (tmp_path / "model.conformal.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid conformal record"):
        read_conformal_record(weights)
    # the fingerprint as hex text and without temperature are accepted
    record = save_conformal(weights, [crc, vol], f"{fp:016x}")
    assert record["temperature"] is None and record["alphas"] == [0.2]


# -- bundle side: the fit handler on an evaluator, the inference transforms ----------------------------------------
SPACING = (1.0, 1.0, 2.0)


def _evaluator_cases(n: int, seed: int):
    from monai.data import MetaTensor

    g = torch.Generator().manual_seed(seed)
    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    items = []
    for i in range(n):
        label = torch.zeros(1, 10, 10, 8)
        r = int(torch.randint(2, 4, (1,), generator=g))
        label[:, 5 - r : 5 + r, 5 - r : 5 + r, 2:6] = 1
        label[:, 4:6, 4:6, 3 : 3 + r] = 2
        image = label / 2 + 0.4 * torch.randn(label.shape, generator=g)
        meta = {"filename_or_obj": f"case_{seed}_{i:02d}.nii.gz"}
        items.append(
            {
                "image": MetaTensor(image, affine=affine, meta=dict(meta)),
                "label": MetaTensor(label, affine=affine, meta=dict(meta)),
            }
        )
    return items


def _run_fit_handler(tmp_path, net, n=24, **kwargs):
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine
    from monai.transforms import Activationsd, Compose, CopyItemsd

    from monai_nacl.handlers.conformal import ConformalFitHandler

    post = Compose([Activationsd("pred", softmax=True), CopyItemsd(["pred", "label"], names=["prob", "label_index"])])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(_evaluator_cases(n, seed=0)), batch_size=5),
        network=net,
        postprocessing=post,
    )
    handler = ConformalFitHandler(
        net,
        C,
        alphas=[0.2, 0.1],
        output_transform=from_engine(["prob", "label_index"]),
        save_path=tmp_path / "model.pt",
        class_names=["background", "anterior", "posterior"],
        bins=200,
        data="synthetic",
        **kwargs,
    )
    handler.attach(evaluator)
    return evaluator, handler


def _direct_probs(net, items):
    with torch.no_grad():
        return [torch.softmax(net(item["image"][None].as_tensor()), 1)[0] for item in items]


def test_conformal_fit_handler_writes_the_record(tmp_path):
    from monai_nacl.conformal import check_conformal_record, load_conformal, read_conformal_record
    from monai_nacl.temperature import save_calibrated, weights_fingerprint

    net = _tiny_network()
    save_calibrated(net.state_dict(), tmp_path / "model.pt")
    evaluator, handler = _run_fit_handler(
        tmp_path, net, methods=["risk_control", "volume_intervals", "prediction_sets"]
    )
    evaluator.run()
    record = read_conformal_record(tmp_path / "model.pt")
    assert record["fitted_by"] == "ConformalFitHandler" and record["cases"] == 24 and record["data"] == "synthetic"
    assert record["alphas"] == [0.2, 0.1] and len(record["fits"]) == 6
    assert record["weights_fingerprint"] == f"{weights_fingerprint(net):016x}"
    assert record["temperature"] == pytest.approx([0.8, 1.6])
    assert check_conformal_record(tmp_path / "model.pt") == []
    # the handler's fits equal the methods fitted directly on the calibrated probabilities of the same cases
    items = _evaluator_cases(24, seed=0)
    probs = _direct_probs(net, items)
    for alpha in (0.2, 0.1):
        crc = ConformalRiskControl(C, bins=200)
        vol = ConformalVolumeIntervals(C)
        for p, item in zip(probs, items):
            crc.update(p, item["label"].as_tensor())
            vol.update(p, item["label"].as_tensor(), spacing=SPACING)
        t_in, t_out = crc.fit(alpha)
        got = load_conformal(record, "risk_control", alpha)
        assert torch.equal(got.inner_threshold, t_in) and torch.equal(got.outer_threshold, t_out)
        assert got.n == crc.n == [24, 24, 24]
        assert torch.allclose(load_conformal(record, "volume_intervals", alpha).quantile, vol.fit(alpha), rtol=1e-5)
        assert load_conformal(record, "prediction_sets", alpha).n == 24
    # informative at alpha 0.2 with 24 cases: an outer threshold above 0 for the structures
    assert bool((load_conformal(record, "risk_control", 0.2).outer_threshold[1:] > 0).all())


def test_conformal_fit_handler_refuses_a_temperature_change(tmp_path):
    from ignite.engine import Events

    from monai_nacl.conformal import read_conformal_record
    from monai_nacl.temperature import save_calibrated

    net = _tiny_network()
    save_calibrated(net.state_dict(), tmp_path / "model.pt")
    evaluator, _ = _run_fit_handler(tmp_path, net, n=6)
    # as if a TemperatureFitHandler on the same evaluator refitted T at the end of the pass
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda _: net.set_temperature(torch.tensor([1.0, 1.0])))
    with pytest.raises(ValueError, match="temperature changed during the conformal pass"):
        evaluator.run()
    assert read_conformal_record(tmp_path / "model.pt") is None


def test_conformal_fit_handler_bad_arguments():
    from monai_nacl.handlers.conformal import ConformalFitHandler

    net = _tiny_network()
    for alphas in ([], 0.1, [0.1, 0.1], [1.5], "0.1"):
        with pytest.raises(ValueError, match="alpha"):
            ConformalFitHandler(net, C, alphas=alphas)
    for methods in ([], "risk_control", ["masks"], ["risk_control", "risk_control"]):
        with pytest.raises(ValueError, match="methods"):
            ConformalFitHandler(net, C, methods=methods)
    for key in ("fitted_by", "inferer", "cases"):
        with pytest.raises(ValueError, match=f"provenance keys \\['{key}'\\] are written by the handler"):
            ConformalFitHandler(net, C, **{key: "mine"})


# -- distributed: every rank's cases gathered, the fit of one process --------------------------------------------
DDP_ALPHAS = [0.4, 0.2]  # both finite-sample quantiles exist with 5 cases


def _ddp_data():
    """5 cases: probabilities, labels, logits (for the temperature), as plain tensors (pickled to the workers)."""
    probs, labels = _dirichlet_cases(5, seed=21)
    logits = torch.randn(5, C, *SHAPE, generator=torch.Generator().manual_seed(22)) * 2
    logits[:, 0] += 5  # a sparse predicted foreground: voxels near it and away from it, one temperature each
    return probs, labels, logits


def _case(prob: torch.Tensor):
    from monai.data import MetaTensor

    return MetaTensor(prob, affine=torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64)))


def _fit_cases(weights, indices, probs, labels, logits):
    """Run TemperatureFitHandler and ConformalFitHandler (all three methods) over ``indices``, one case per
    iteration as a decollating evaluator gives them; return both handlers."""
    from ignite.engine import Engine

    from monai_nacl.handlers import TemperatureFitHandler
    from monai_nacl.handlers.conformal import ConformalFitHandler

    methods = ["risk_control", "volume_intervals", "prediction_sets"]
    net = _tiny_network()
    conformal = ConformalFitHandler(net, C, alphas=DDP_ALPHAS, methods=methods, save_path=weights, bins=200)
    engine = Engine(lambda e, batch: batch)
    conformal.attach(engine)
    engine.run([([_case(probs[i])], [labels[i]]) for i in indices])
    temperature = TemperatureFitHandler(net, C, voxels_per_volume=10**6)  # no sampling: all voxels
    engine = Engine(lambda e, batch: batch)
    temperature.attach(engine)
    engine.run([([logits[i]], [labels[i]]) for i in indices])
    return conformal, temperature


def _ddp_fit_worker(rank, port, weights, data, out):
    import torch.distributed as dist
    from ignite.engine import Engine, Events

    from monai_nacl.handlers.conformal import ConformalFitHandler

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    probs, labels, logits = data
    # as DistributedSampler(even_divisible=False, shuffle=False) splits 5 cases: 0, 2, 4 and 1, 3
    conformal, temperature = _fit_cases(weights, range(rank, 5, 2), probs, labels, logits)
    out[rank] = {
        "cases": conformal.num_cases,
        "fits": [f.to_json() for f in conformal.fitted],
        "temperature": temperature.fitted.tolist(),
        "volumes": temperature.fitter.num_volumes,
    }
    # rank 0's value wins on every rank (the fitted temperature correction is shared this way)
    from monai_nacl.distributed import broadcast_from_rank0

    out[f"broadcast{rank}"] = broadcast_from_rank0(torch.tensor([0.5 + rank], dtype=torch.float64)).tolist()
    # a rank without any case still takes part; its estimator holds the other rank's cases afterwards
    vol = ConformalVolumeIntervals(C)
    if rank == 0:
        vol.update(probs, labels, spacing=SPACING)
    vol.all_gather()
    out[f"vol{rank}"] = vol.fit(0.2).tolist()
    # ranks holding different temperatures are refused on every rank (none waits for the other)
    net = _tiny_network()
    if rank == 1:
        net.set_temperature(torch.tensor([1.0, 1.0]))
    handler = ConformalFitHandler(net, C, alphas=[0.2])
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine)
    try:
        engine.run([([_case(probs[rank])], [labels[rank]])])
        out[f"refused{rank}"] = ""
    except ValueError as e:
        out[f"refused{rank}"] = str(e)
    # a temperature that changes during the pass on rank 1 only is refused on both ranks (rank 0 writes nothing)
    net = _tiny_network()
    handler = ConformalFitHandler(net, C, alphas=[0.2], save_path=weights.parent / "changed" / "model.pt")
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine)
    if rank == 1:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: net.set_temperature(torch.tensor([2.0, 2.0])))
    try:
        engine.run([([_case(probs[rank])], [labels[rank]])])
        out[f"changed{rank}"] = ""
    except ValueError as e:
        out[f"changed{rank}"] = str(e)
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (about 20 s on two busy cores)
def test_distributed_fit_equals_the_fit_of_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from monai_nacl.conformal import check_conformal_record, read_conformal_record
    from monai_nacl.temperature import save_calibrated

    data = _ddp_data()
    for folder in ("single", "ddp", "rank0"):
        save_calibrated(_tiny_network().state_dict(), tmp_path / folder / "model.pt")
    single, single_t = _fit_cases(tmp_path / "single" / "model.pt", range(5), *data)
    alone, _ = _fit_cases(tmp_path / "rank0" / "model.pt", [0, 2, 4], *data)  # what rank 0 fitted before
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_fit_worker, args=(port, tmp_path / "ddp" / "model.pt", data, out), nprocs=2, join=True)

    expected = [f.to_json() for f in single.fitted]
    assert len(expected) == 6 and expected != [f.to_json() for f in alone.fitted]
    assert out["broadcast0"] == out["broadcast1"] == [0.5]
    assert "on another rank" in out["changed0"] and "-> tensor" in out["changed1"]
    assert not (tmp_path / "ddp" / "changed").exists()
    for rank in range(2):  # every rank fitted on all 5 cases, exactly what one process fits
        assert out[rank]["cases"] == 5 and out[rank]["fits"] == expected
        assert out[rank]["volumes"] == 5
        assert out[rank]["temperature"] == pytest.approx(single_t.fitted.tolist(), rel=1e-5)
        assert out[f"vol{rank}"] == out["vol0"]
        assert "ranks hold different temperatures" in out[f"refused{rank}"]
    assert out[0]["temperature"] == out[1]["temperature"]  # the same temperature on every rank, bit for bit
    # rank 0 wrote the record, the one the single process wrote but for the time it was written
    ddp, one = (
        read_conformal_record(tmp_path / "ddp" / "model.pt"),
        read_conformal_record(tmp_path / "single" / "model.pt"),
    )
    assert ddp.pop("written") and one.pop("written")
    assert ddp == one and ddp["cases"] == 5
    assert check_conformal_record(tmp_path / "ddp" / "model.pt") == []
    single_vol = ConformalVolumeIntervals(C)
    single_vol.update(data[0], data[1], spacing=SPACING)
    assert out["vol0"] == single_vol.fit(0.2).tolist()


def test_conformal_transforms(tmp_path):
    import csv

    from monai.data import MetaTensor

    from monai_nacl.conformal import StaleConformalWarning, load_conformal
    from monai_nacl.temperature import save_calibrated
    from monai_nacl.transforms.conformal import ConformalMasksd, StructureVolumeIntervalsd

    net = _tiny_network()
    weights = tmp_path / "model.pt"
    save_calibrated(net.state_dict(), weights)
    evaluator, _ = _run_fit_handler(tmp_path, net)
    evaluator.run()
    crc, vol = load_conformal(weights, "risk_control", 0.2), load_conformal(weights, "volume_intervals", 0.2)

    masks = ConformalMasksd("prob", weights, alpha=0.2)
    intervals = StructureVolumeIntervalsd("prob", weights, alpha=0.2, seg_key="pred", output_dir=tmp_path / "out")
    items = _evaluator_cases(3, seed=1)
    rows_expected = []
    for item, p in zip(items, _direct_probs(net, items)):
        prob = MetaTensor(p, meta=dict(item["image"].meta))  # the meta holds the affine
        d = {"prob": prob, "pred": p.argmax(0, keepdim=True), "result": {"output_kind": "segmentation"}}
        d = intervals(masks(d))
        inner, outer = crc.predict(p)
        for key, ref in (("conformal_inner", inner), ("conformal_outer", outer)):
            assert isinstance(d[key], MetaTensor) and d[key].dtype == torch.uint8 and d[key].shape == (2, 10, 10, 8)
            assert torch.equal(d[key].as_tensor().bool(), ref[1:]) and torch.equal(d[key].affine, prob.affine)
        summary = d["result"]["conformal_masks"]
        assert summary["alpha"] == 0.2 and set(summary["structures"]) == {"anterior", "posterior"}
        assert summary["structures"]["anterior"]["outer_voxels"] == int(outer[1].sum())
        assert summary["structures"]["anterior"]["outer_ml"] == pytest.approx(int(outer[1].sum()) * 2e-3)
        low, high = vol.predict(p, spacing=SPACING)
        got = d["result"]["volume_intervals"]["structures"]
        assert d["result"]["output_kind"] == "segmentation"  # existing result entries are kept
        for c, name in ((1, "anterior"), (2, "posterior")):
            assert got[name]["low_ml"] == pytest.approx(float(low[c])) and got[name]["high_ml"] == pytest.approx(
                float(high[c])
            )
            assert got[name]["low_ml"] <= got[name]["expected_volume_ml"] <= got[name]["high_ml"]
            assert got[name]["expected_volume_ml"] == pytest.approx(float(p[c].sum()) * 2e-3, rel=1e-5)
            assert got[name]["segmentation_volume_ml"] == pytest.approx(int((p.argmax(0) == c).sum()) * 2e-3)
            rows_expected.append((item["image"].meta["filename_or_obj"], name, float(low[c]), float(high[c])))
    with open(intervals.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["structure"]) for r in rows] == [e[:2] for e in rows_expected]
    for r, e in zip(rows, rows_expected):
        assert float(r["alpha"]) == 0.2 and (float(r["low_ml"]), float(r["high_ml"])) == pytest.approx(e[2:])
        assert float(r["segmentation_volume_ml"]) >= 0
    # a second transform (a new inference run) rewrites the file
    again = StructureVolumeIntervalsd("prob", weights, alpha=0.2, output_dir=tmp_path / "out")
    again({"prob": prob})
    with open(again.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "segmentation_volume_ml" not in rows[0]

    # errors: another class count, a missing record, an unknown alpha, a stale record
    with pytest.raises(ValueError, match="3 classes"):
        masks({"prob": torch.full((2, 4, 4, 4), 0.5)})
    with pytest.raises(FileNotFoundError, match="calibrate.json"):
        ConformalMasksd("prob", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"alpha \[0.2, 0.1\]"):
        StructureVolumeIntervalsd("prob", weights, alpha=0.05)
    with pytest.raises(ValueError, match="structures"):
        ConformalMasksd("prob", weights, alpha=0.2, structures=[3])
    with torch.no_grad():
        net.network.bias.add_(0.1)
    net.set_temperature(torch.tensor([0.8, 1.6]))
    # weights replaced behind the record's back (save_calibrated would remove the record, see below)
    torch.save(net.state_dict(), weights)
    with pytest.warns(StaleConformalWarning):
        ConformalMasksd("prob", weights, alpha=0.1)
    with pytest.raises(ValueError, match="does not belong"):
        StructureVolumeIntervalsd("prob", weights, alpha=0.1, strict=True)


def test_conformal_transforms_without_a_record_pass_through_when_missing_ok(tmp_path, caplog):
    from monai_nacl.temperature import save_calibrated
    from monai_nacl.transforms.conformal import ConformalMasksd, StructureVolumeIntervalsd

    weights = tmp_path / "model.pt"
    save_calibrated(_tiny_network().state_dict(), weights)
    with pytest.raises(FileNotFoundError, match="no conformal record"):
        ConformalMasksd("prob", weights)
    with caplog.at_level("WARNING"):
        masks = ConformalMasksd("prob", weights, missing_ok=True)
        intervals = StructureVolumeIntervalsd("prob", weights, output_dir=tmp_path / "out", missing_ok=True)
    assert caplog.text.count("no conformal record") == 2
    d = {"prob": torch.full((3, 4, 4, 4), 1 / 3), "result": {"output_kind": "segmentation"}}
    out = intervals(masks(d))
    assert set(out) == {"prob", "result"} and out["result"] == {"output_kind": "segmentation"}
    assert not (tmp_path / "out").exists()


def test_saving_new_weights_removes_a_stale_conformal_record(tmp_path):
    from monai_nacl.conformal import check_conformal_record, conformal_record_path
    from monai_nacl.temperature import save_calibrated

    net = _tiny_network()
    weights = tmp_path / "model.pt"
    save_calibrated(net.state_dict(), weights)
    evaluator, _ = _run_fit_handler(tmp_path, net)
    evaluator.run()
    assert conformal_record_path(weights).is_file() and check_conformal_record(weights) == []
    save_calibrated(net.state_dict(), weights)  # the same weights and temperatures: the record stays valid
    assert conformal_record_path(weights).is_file()
    with torch.no_grad():
        net.network.bias.add_(0.1)
    net.set_temperature(torch.tensor([0.8, 1.6]))
    save_calibrated(net.state_dict(), weights)
    assert not conformal_record_path(weights).exists()


def test_unbounded_fits_reach_the_client_as_null_not_infinity(tmp_path):
    import json

    from monai.data import MetaTensor

    from monai_nacl.temperature import save_calibrated
    from monai_nacl.transforms.conformal import ConformalMasksd, StructureVolumeIntervalsd

    net = _tiny_network()
    weights = tmp_path / "model.pt"
    save_calibrated(net.state_dict(), weights)
    evaluator, _ = _run_fit_handler(tmp_path, net)
    evaluator.run()
    masks = ConformalMasksd("prob", weights, alpha=0.2)
    intervals = StructureVolumeIntervalsd("prob", weights, alpha=0.2, output_dir=tmp_path / "out")
    masks.fit.inner_threshold[1] = float("inf")  # as a fit on too few cases gives
    intervals.fit.quantile = torch.full_like(torch.as_tensor(intervals.fit.quantile, dtype=torch.float64), torch.inf)
    item = _evaluator_cases(1, seed=2)[0]
    p = _direct_probs(net, [item])[0]
    d = intervals(masks({"prob": MetaTensor(p, meta=dict(item["image"].meta))}))
    text = json.dumps(d["result"], allow_nan=False)  # MONAI Label's JSON response is strict
    assert json.loads(text)["conformal_masks"]["structures"]["anterior"]["inner_threshold"] is None
    assert all(v["high_ml"] is None for v in d["result"]["volume_intervals"]["structures"].values())
    assert "inf" in (tmp_path / "out" / "volume_intervals.csv").read_text()


def test_an_unreadable_conformal_record_is_removed_when_weights_are_saved(tmp_path):
    from monai_nacl.conformal import conformal_record_path
    from monai_nacl.temperature import save_calibrated

    weights = tmp_path / "model.pt"
    conformal_record_path(weights).write_text("{not json")
    save_calibrated(_tiny_network().state_dict(), weights)  # no crash mid-training; the bad record goes
    assert not conformal_record_path(weights).exists() and weights.is_file()


def test_fit_on_too_few_cases_for_alpha_warns(tmp_path, caplog):
    from monai_nacl.temperature import save_calibrated

    net = _tiny_network()
    save_calibrated(net.state_dict(), tmp_path / "model.pt")
    evaluator, handler = _run_fit_handler(tmp_path, net, n=6)  # alphas 0.2 (needs 4 cases) and 0.1 (needs 9)
    with caplog.at_level("WARNING"):
        evaluator.run()
    assert "alpha 0.1 needs at least 9 calibration cases, got 6" in caplog.text
    assert "alpha 0.2 needs" not in caplog.text
