from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from monai.metrics import CalibrationErrorMetric
from torchmetrics.classification import MulticlassCalibrationError

from monai_nacl.metrics import CalibrationMetric, calibration_errors


def _probs(shape, c, rng, scale=2.0):
    return torch.softmax(torch.randn((shape[0], c, *shape[1:]), generator=rng) * scale, 1)


def brute_force(p: np.ndarray, y: np.ndarray, num_bins: int = 15) -> dict[str, float]:
    """Per-voxel loops over a flat (N, C) array: an independent transcription of the definitions."""
    n, c = p.shape

    def binned(conf, acc):
        bins = [[] for _ in range(num_bins)]
        for cf, a in zip(conf, acc):
            bins[min(int(cf * num_bins), num_bins - 1)].append((cf, a))
        gaps = [(len(b), abs(np.mean([a for _, a in b]) - np.mean([cf for cf, _ in b]))) for b in bins if b]
        ece = sum(k * g for k, g in gaps) / len(conf)
        return ece, np.mean([g for _, g in gaps]), max(g for _, g in gaps)

    conf, pred = p.max(1), p.argmax(1)
    ece, ace, mce = binned(conf, (pred == y).astype(float))
    cece = np.mean([binned(p[:, k], (y == k).astype(float))[0] for k in range(c)])
    nll = np.mean([-math.log(max(p[i, y[i]], 1e-12)) for i in range(n)])
    onehot = np.eye(c)[y]
    brier = np.mean(((p - onehot) ** 2).sum(1))
    return {"ece": ece, "ace": ace, "mce": mce, "cece": cece, "nll": nll, "brier": brier}


def _flat(p, y, keep):
    c = p.shape[1]
    pf = p.movedim(1, -1).reshape(-1, c).double().numpy()
    yf = y.reshape(-1).numpy()
    k = keep.reshape(-1).numpy()
    return pf[k], yf[k]


@pytest.mark.parametrize("mask", ["all", "foreground"])
def test_every_key_against_brute_force_micro_and_macro(mask, rng):
    p = _probs((3, 9, 8, 7), 3, rng)
    y = torch.randint(0, 3, (3, 1, 9, 8, 7), generator=rng)
    metric = CalibrationMetric(3, mask=mask)
    metric(p, y)
    keep = torch.ones_like(y, dtype=torch.bool) if mask == "all" else y != 0
    micro = brute_force(*_flat(p, y, keep))
    per_vol = [brute_force(*_flat(p[i : i + 1], y[i : i + 1], keep[i : i + 1])) for i in range(3)]
    got_micro, got_macro = metric.aggregate("micro"), metric.aggregate("macro")
    for key in micro:
        assert got_micro[key] == pytest.approx(micro[key], rel=1e-5, abs=1e-7), key
        assert got_macro[key] == pytest.approx(np.mean([v[key] for v in per_vol]), rel=1e-5, abs=1e-7), key
    assert got_macro["n_volumes"] == 3 and got_macro["n_voxels"] == int(keep.sum())


def test_hand_computed_two_voxels():
    # voxel 1: p = (0.9, 0.1), y = 0 -> conf 0.9, correct; voxel 2: p = (0.3, 0.7), y = 0 -> conf 0.7, wrong
    p = torch.tensor([[0.9, 0.3], [0.1, 0.7]]).view(1, 2, 2, 1, 1)
    y = torch.tensor([0, 0]).view(1, 1, 2, 1, 1)
    m = CalibrationMetric(2, num_bins=10)
    m(p, y)
    r = m.aggregate("micro")
    assert r["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.7)
    assert r["ace"] == pytest.approx((0.1 + 0.7) / 2)
    assert r["mce"] == pytest.approx(0.7)
    assert r["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.3)) / 2)
    assert r["brier"] == pytest.approx(((0.1**2 + 0.1**2) + (0.7**2 + 0.7**2)) / 2)
    # class 0 bins: 0.9 (acc 1) and 0.3 (acc 1); class 1 bins: 0.1 (acc 0), 0.7 (acc 0)
    assert r["cece"] == pytest.approx(((0.1 + 0.7) / 2 + (0.1 + 0.7) / 2) / 2)


def test_probability_one_lands_in_last_bin():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 2, 1, 1)
    y = torch.tensor([0, 0]).view(1, 1, 2, 1, 1)
    m = CalibrationMetric(2)
    stats = m.update(p, y)
    assert stats.top[0, 0, -1].item() == 2  # both top-label confidences of 1.0 are in the last bin
    assert stats.top[0, 0].sum().item() == 2
    assert m.aggregate("micro")["ece"] == pytest.approx(0.5)


def test_matches_monai_one_vs_rest_per_image_and_class(rng):
    p = _probs((2, 10, 9, 8), 4, rng)
    y = torch.randint(0, 4, (2, 1, 10, 9, 8), generator=rng)
    onehot = F.one_hot(y[:, 0], 4).movedim(-1, 1).float()
    ref = CalibrationErrorMetric(num_bins=15, include_background=True, metric_reduction="none")(p, onehot)
    stats = CalibrationMetric(4).update(p, y)
    from monai_nacl.metrics.calibration import _binned_errors

    ours = _binned_errors(stats.ovr[:, 0], stats.ovr[:, 1], stats.ovr[:, 2])[0]
    torch.testing.assert_close(ours.float(), ref, atol=1e-6, rtol=0)
    assert calibration_errors(stats)["cece"].tolist() == pytest.approx(ref.mean(1).tolist(), abs=1e-6)


def test_top_label_micro_matches_torchmetrics(rng):
    p = _probs((2, 12, 10, 9), 3, rng)
    y = torch.randint(0, 3, (2, 1, 12, 10, 9), generator=rng)
    ref = MulticlassCalibrationError(3, n_bins=15, norm="l1")(p.movedim(1, -1).reshape(-1, 3), y.reshape(-1))
    m = CalibrationMetric(3)
    m(p, y)
    assert m.aggregate("micro")["ece"] == pytest.approx(ref.item(), abs=1e-6)


def test_streaming_equals_one_shot_and_list_input(rng):
    p = _probs((4, 6, 6, 6), 3, rng)
    y = torch.randint(0, 3, (4, 1, 6, 6, 6), generator=rng)
    one = CalibrationMetric(3, per_volume=True)
    one(p, y)
    streamed = CalibrationMetric(3, per_volume=True)
    streamed(p[:1], y[:1])
    streamed(list(p[1:]), list(y[1:]))  # decollated batches, as ignite handlers pass them
    for red in ("micro", "macro"):
        a, b = one.aggregate(red), streamed.aggregate(red)
        assert a == pytest.approx(b)
    assert len(streamed.get_per_volume()) == 4
    assert streamed.get_per_volume()[2]["ece"] == pytest.approx(one.get_per_volume()[2]["ece"])


def test_state_is_flat_in_number_of_volumes(rng):
    m = CalibrationMetric(3)
    sizes = []
    for _ in range(3):
        m(_probs((2, 8, 8, 8), 3, rng), torch.randint(0, 3, (2, 1, 8, 8, 8), generator=rng))
        sizes.append(sum(t.numel() for t in (m._pooled.top, m._pooled.ovr, m._pooled.scalars, m._macro_sum)))
    assert sizes[0] == sizes[-1]


def test_empty_foreground_volume_is_reported_not_nan(rng):
    p = _probs((2, 5, 5, 5), 3, rng)
    y = torch.randint(1, 3, (2, 1, 5, 5, 5), generator=rng)
    y[1] = 0
    m = CalibrationMetric(3, mask="foreground", per_volume=True)
    with pytest.warns(UserWarning, match="no voxel"):
        m(p, y)
    r = m.aggregate()
    assert r["n_volumes"] == 1 and r["n_empty"] == 1
    assert all(math.isfinite(r[k]) for k in ("ece", "cece", "nll"))
    assert math.isnan(m.get_per_volume()[1]["ece"])
    empty = CalibrationMetric(3).aggregate()
    assert math.isnan(empty["ece"]) and empty["n_volumes"] == 0


def test_ignore_index_voxels_do_not_count(rng):
    p = _probs((1, 6, 6, 6), 3, rng)
    y = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=rng)
    y_ign = y.clone()
    y_ign[..., :2] = 255
    m = CalibrationMetric(3, ignore_index=255)
    m(p, y_ign)
    ref = brute_force(*_flat(p, y, y_ign != 255))
    assert m.aggregate("micro")["ece"] == pytest.approx(ref["ece"], rel=1e-6)


def test_bad_input(rng):
    m = CalibrationMetric(3)
    p = _probs((1, 4, 4, 4), 3, rng)
    y = torch.randint(0, 3, (1, 1, 4, 4, 4), generator=rng)
    with pytest.raises(ValueError, match="channels"):
        m(p[:, :2], y)
    with pytest.raises(ValueError, match="outside"):
        m(p, y + 3)
    with pytest.raises(ValueError, match="probabilities"):
        m(p * 3, y)
    with pytest.raises(ValueError, match="does not match"):
        m(p, y[..., :2])
    with pytest.raises(ValueError, match="mask"):
        CalibrationMetric(3, mask="fg")
    with pytest.raises(ValueError, match="binning.*did you mean 'adaptive'"):
        CalibrationMetric(3, binning="adaptiv")
    with pytest.raises(ValueError, match="binning"):
        CalibrationMetric(3, binning=None)
    with pytest.raises(ValueError, match="per_volume"):
        m.get_per_volume()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, p, y, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = CalibrationMetric(3, mask="foreground")
    m(p[rank : rank + 1], y[rank : rank + 1])
    a = CalibrationMetric(3, mask="foreground", binning="adaptive")
    a(p[rank : rank + 1], y[rank : rank + 1])
    local = CalibrationMetric(3, mask="foreground", sync=False)
    local(p[rank : rank + 1], y[rank : rank + 1])
    out[rank] = [m.aggregate("micro"), m.aggregate("macro"), a.aggregate("micro"), a.aggregate("macro")]
    out[rank] += [local.aggregate("micro")]
    dist.destroy_process_group()


def test_distributed_all_reduce_two_processes(rng):
    p = _probs((2, 6, 6, 6), 3, rng)
    y = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=rng)
    single = CalibrationMetric(3, mask="foreground")
    single(p, y)
    manager = mp.Manager()
    out = manager.dict()
    adaptive = CalibrationMetric(3, mask="foreground", binning="adaptive")
    adaptive(p, y)
    mp.spawn(_worker, args=(_free_port(), p, y, out), nprocs=2, join=True)
    for rank in range(2):
        micro, macro, a_micro, a_macro, local = out[rank]
        assert micro == pytest.approx(single.aggregate("micro"))
        assert macro == pytest.approx(single.aggregate("macro"))
        assert a_micro == pytest.approx(adaptive.aggregate("micro"))
        assert a_macro == pytest.approx(adaptive.aggregate("macro"))
        alone = CalibrationMetric(3, mask="foreground")  # sync=False: this rank's volume only
        alone(p[rank : rank + 1], y[rank : rank + 1])
        assert local == pytest.approx(alone.aggregate("micro"))


# --- shapes and memory layouts (regression: a last, shorter block used to fail with a non-contiguous view) ---


def _layouts(p, y, layout):
    """The same values in another memory layout: channels-last, or a transposed sample matrix."""
    if layout == "contiguous":
        return p, y
    if layout == "channels_last":
        return p.movedim(1, -1).contiguous().movedim(-1, 1), y.movedim(1, -1).contiguous().movedim(-1, 1)
    flat = p.reshape(p.shape[0], p.shape[1], -1)  # transposed: B,C,N viewed on an N,C matrix (the fitter's sample)
    return flat.transpose(1, 2).contiguous().transpose(1, 2), y.reshape(y.shape[0], 1, -1)


@pytest.mark.parametrize(
    "shape, c",
    [
        ((1, 70000), 4),  # one long spatial dim: several blocks, the last one shorter
        ((4, 9000), 8),
        ((4, 90, 100), 8),
        ((1, 50, 40, 37), 4),
        ((4, 21, 22, 23), 8),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_any_shape_and_layout_against_brute_force(shape, c, layout, rng):
    p = _probs(shape, c, rng)
    y = torch.randint(0, c, (shape[0], 1, *shape[1:]), generator=rng)
    pl, yl = _layouts(p, y, layout)
    assert torch.equal(pl.reshape(p.shape), p)
    if layout != "contiguous":
        assert not pl.is_contiguous()
    metric = CalibrationMetric(c, mask="foreground")
    metric(pl, yl)
    got = metric.aggregate("micro")
    ref = brute_force(*_flat(p, y, y != 0))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


# --- adaptive (equal-mass) binning ---


def brute_force_adaptive(p: np.ndarray, y: np.ndarray, num_bins: int = 15, order=None) -> dict[str, float]:
    """Sort the confidences, split into equal-count runs (numpy.array_split), per-run gaps; ties in the given
    order (a permutation applied before a stable sort)."""
    n, c = p.shape
    order = np.arange(n) if order is None else order

    def binned(conf, acc):
        conf, acc = conf[order], acc[order]
        s = np.argsort(conf, kind="stable")
        runs = [(cf, a) for cf, a in zip(np.array_split(conf[s], num_bins), np.array_split(acc[s], num_bins))]
        gaps = [(len(cf), abs(a.mean() - cf.mean())) for cf, a in runs if len(cf)]
        return sum(k * g for k, g in gaps) / n, np.mean([g for _, g in gaps]), max(g for _, g in gaps)

    ece, ace, mce = binned(p.max(1), (p.argmax(1) == y).astype(float))
    cece = np.mean([binned(p[:, k], (y == k).astype(float))[0] for k in range(c)])
    return {"ece": ece, "ace": ace, "mce": mce, "cece": cece}


def _separated_two_class(n_vol, n, rng):
    """Two classes, p_0 = (i + 1/2) / (2 N) over all N voxels in a random order (spacing 1/400 or more, wider than
    the fine bins below 1/2): every confidence and every p_c is alone in its fine bin."""
    assert n_vol * n <= 200
    p0 = ((torch.randperm(n_vol * n, generator=rng) + 0.5) / (2 * n_vol * n)).view(n_vol, n)
    p = torch.stack([p0, 1 - p0], 1).float()
    return p, torch.randint(0, 2, (n_vol, 1, n), generator=rng)


@pytest.mark.parametrize("num_bins", [15, 7])
def test_adaptive_exact_when_no_fine_bin_is_cut(num_bins, rng):
    p, y = _separated_two_class(3, 60, rng)
    metric = CalibrationMetric(2, num_bins=num_bins, binning="adaptive")
    metric(p, y)
    micro, macro = metric.aggregate("micro"), metric.aggregate("macro")
    ref = brute_force_adaptive(*_flat(p, y, torch.ones_like(y, dtype=torch.bool)), num_bins=num_bins)
    per_vol = [brute_force_adaptive(*_flat(p[i : i + 1], y[i : i + 1], y[i : i + 1] >= 0), num_bins) for i in range(3)]
    for key in ref:
        assert micro[f"{key}_bound"] == 0 and macro[f"{key}_bound"] == 0
        assert micro[key] == pytest.approx(ref[key], abs=1e-7), key
        assert macro[key] == pytest.approx(np.mean([v[key] for v in per_vol]), abs=1e-7), key
    uniform = CalibrationMetric(2, num_bins=num_bins)
    uniform(p, y)
    assert uniform.aggregate("micro")["ece"] != pytest.approx(micro["ece"], abs=1e-4)  # another binning


@pytest.mark.parametrize("mask", ["all", "foreground"])
def test_adaptive_within_its_bound_micro_and_macro(mask, rng):
    p = _probs((3, 11, 10, 9), 3, rng)
    y = torch.randint(0, 3, (3, 1, 11, 10, 9), generator=rng)
    metric = CalibrationMetric(3, mask=mask, binning="adaptive", per_volume=True)
    metric(p, y)
    keep = torch.ones_like(y, dtype=torch.bool) if mask == "all" else y != 0
    micro, macro = metric.aggregate("micro"), metric.aggregate("macro")
    ref = brute_force_adaptive(*_flat(p, y, keep))
    per_vol = [brute_force_adaptive(*_flat(p[i : i + 1], y[i : i + 1], keep[i : i + 1])) for i in range(3)]
    assert micro["ece_bound"] > 0  # fine bins are cut here: the bound is what is tested
    for key in ref:
        assert abs(micro[key] - ref[key]) <= micro[f"{key}_bound"] + 1e-7, key
        for i, row in enumerate(metric.get_per_volume()):
            assert abs(row[key] - per_vol[i][key]) <= row[f"{key}_bound"] + 1e-7, (key, i)
        assert macro[key] == pytest.approx(np.mean([r[key] for r in metric.get_per_volume()]))
    for key in ("nll", "brier"):  # not binned: as the uniform metric
        assert micro[key] == pytest.approx(brute_force(*_flat(p, y, keep))[key], rel=1e-5)


def test_adaptive_ties_are_shared_and_bounded(rng):
    # every voxel has the same probabilities: every bin edge cuts one fine bin; the exact value depends on the
    # order of the tied voxels, the metric's does not, and every order is within the bound
    n = 300
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).view(1, 3, 1).expand(1, 3, n).contiguous()
    y = torch.randint(0, 3, (1, 1, n), generator=rng)
    metric = CalibrationMetric(3, binning="adaptive")
    metric(p, y)
    got = metric.aggregate("micro")
    acc = float((y == 0).double().mean())
    assert got["ece"] == pytest.approx(abs(acc - 0.7))  # each bin: the pooled accuracy and confidence
    flat = _flat(p, y, y >= 0)
    gen = np.random.default_rng(0)
    for _ in range(5):
        ref = brute_force_adaptive(*flat, order=gen.permutation(n))
        for key in ref:
            assert abs(got[key] - ref[key]) <= got[f"{key}_bound"] + 1e-9, key


def test_adaptive_streaming_and_list_input_equal_one_shot(rng):
    p = _probs((4, 7, 6, 5), 3, rng)
    y = torch.randint(0, 3, (4, 1, 7, 6, 5), generator=rng)
    one = CalibrationMetric(3, binning="adaptive")
    one(p, y)
    streamed = CalibrationMetric(3, binning="adaptive")
    streamed(p[:1], y[:1])
    streamed(list(p[1:]), list(y[1:]))
    for red in ("micro", "macro"):
        assert one.aggregate(red) == pytest.approx(streamed.aggregate(red), rel=1e-12, abs=1e-12)
    # the equal-mass bins themselves: calibration_errors of bin_statistics() reproduces the micro values
    stats = streamed.bin_statistics()
    assert stats.top.shape == (1, 3, 15) and stats.ovr.shape == (1, 3, 3, 15)
    assert stats.top[0, 0].tolist() == [float(len(r)) for r in np.array_split(np.arange(4 * 210), 15)]
    again = calibration_errors(stats)
    for key in ("ece", "ace", "mce", "cece"):
        assert float(again[key][0]) == pytest.approx(streamed.aggregate("micro")[key], rel=1e-12)
    assert len(stats.to_dict()["top_label"]["count"]) == 15


def test_equal_mass_bins_hand_computed():
    from monai_nacl.metrics import equal_mass_bins

    # fine bins of 2, 0, 3 voxels; 2 equal-mass bins of 3 and 2 voxels: the third fine bin is cut 1 / 2
    n = torch.tensor([2.0, 0.0, 3.0])
    s_conf, s_acc = torch.tensor([0.4, 0.0, 2.7]), torch.tensor([1.0, 0.0, 3.0])
    count, conf, acc, split = equal_mass_bins(n, s_conf, s_acc, 2)
    assert count.tolist() == [3.0, 2.0]
    assert conf.tolist() == pytest.approx([0.4 + 0.9, 1.8])
    assert acc.tolist() == pytest.approx([2.0, 2.0])
    assert split.tolist() == pytest.approx([1 * 2 / 3, 2 * 1 / 3])
    # more bins than voxels: empty bins, nothing cut
    count, conf, _, split = equal_mass_bins(torch.tensor([1.0, 1.0]), torch.tensor([0.2, 0.9]), torch.zeros(2), 4)
    assert count.tolist() == [1.0, 1.0, 0.0, 0.0]  # array_split: the first N mod B runs are one longer
    assert conf.tolist() == pytest.approx([0.2, 0.9, 0.0, 0.0])
    assert split.abs().sum() == 0


def test_fine_bin_index_monotone_and_narrow():
    from monai_nacl.metrics import fine_bin_index
    from monai_nacl.metrics.calibration import FINE_WIDTH, NUM_FINE_BINS

    x = torch.cat([torch.tensor([0.0, 1e-38, 1e-20, 0.5, 1.0]), torch.rand(20000, dtype=torch.float64)])
    x = torch.cat([x, 1 - x]).sort().values
    for values in (x, x.float()):
        k = fine_bin_index(values)
        assert int(k.min()) >= 0 and int(k.max()) < NUM_FINE_BINS
        assert bool((k.diff() >= 0).all())
        assert int(fine_bin_index(torch.tensor([1.0]))) == NUM_FINE_BINS - 1
        same = k[1:] == k[:-1]
        assert float((values.diff()[same]).max()) <= FINE_WIDTH / 2  # a fine bin spans at most 2^-8


def test_sums_keep_float64_precision_for_confident_voxels(rng):
    # 128000 confident voxels: float32 running sums of confidences near 1 round up by ~1e-3 per voxel
    z = torch.randn(1, 3, 128000, generator=rng) * 3
    z[:, 0] += 8
    p = torch.softmax(z, 1)
    y = torch.zeros(1, 1, 128000, dtype=torch.long)
    m = CalibrationMetric(3)
    m(p, y)
    pf = p[0].double()
    conf, acc = pf.max(0).values, (pf.argmax(0) == 0).double()
    gap = torch.zeros(15, dtype=torch.float64).index_add_(0, (conf * 15).long().clamp(max=14), acc - conf)
    assert m.aggregate("micro")["ece"] == pytest.approx(float(gap.abs().sum() / conf.numel()), rel=1e-9)
    gap_c = torch.zeros(3, 15, dtype=torch.float64)
    for c in range(3):
        gap_c[c].index_add_(0, (pf[c] * 15).long().clamp(max=14), (y.view(-1) == c).double() - pf[c])
    assert m.aggregate("micro")["cece"] == pytest.approx(float(gap_c.abs().sum(1).mean() / conf.numel()), rel=1e-9)


# --- MONAI-comparable ACE / MCE (Barfoot et al. settings) ---


def brute_force_monai_ace_mce(p: torch.Tensor, y: torch.Tensor, num_bins: int = 20, first: int = 1):
    """Per volume, per class c >= first: equal-width bins of p_c, per-bin |mean p_c - mean [y = c]|; mean (ACE)
    and max (MCE) over non-empty bins; mean over classes, then over volumes."""
    ace, mce = [], []
    for v in range(p.shape[0]):
        a_v, m_v = [], []
        for c in range(first, p.shape[1]):
            pc = p[v, c].reshape(-1).tolist()
            yc = (y[v].reshape(-1) == c).tolist()
            bins: dict[int, list] = {}
            for x, t in zip(pc, yc):
                bins.setdefault(min(int(x * num_bins), num_bins - 1), []).append((x, float(t)))
            gaps = [abs(np.mean([x for x, _ in b]) - np.mean([t for _, t in b])) for b in bins.values()]
            a_v.append(np.mean(gaps))
            m_v.append(max(gaps))
        ace.append(np.mean(a_v))
        mce.append(np.mean(m_v))
    return float(np.mean(ace)), float(np.mean(mce))


def test_monai_calibration_errors_against_monai_and_brute_force(rng):
    from monai_nacl.metrics import monai_calibration_errors

    p = _probs((3, 6, 5, 4), 4, rng)
    y = torch.randint(0, 4, (3, 1, 6, 5, 4), generator=rng)
    got = monai_calibration_errors(p, y, num_classes=4)
    onehot = F.one_hot(y[:, 0], 4).movedim(-1, 1).float()
    for key, red in (("ace", "average"), ("mce", "maximum")):
        direct = CalibrationErrorMetric(
            num_bins=20, include_background=False, calibration_reduction=red, metric_reduction="none"
        )(p, onehot)
        assert direct.shape == (3, 3)
        assert got[key] == pytest.approx(float(direct.mean(1).mean()), abs=1e-7), key
    ace, mce = brute_force_monai_ace_mce(p, y)
    assert got["ace"] == pytest.approx(ace, abs=1e-6) and got["mce"] == pytest.approx(mce, abs=1e-6)
    assert got["n_volumes"] == 3
    # decollated volumes (sizes may differ), one-hot labels and include_background
    assert monai_calibration_errors(list(p), list(y), 4) == pytest.approx(got)
    assert monai_calibration_errors(p, onehot, 4) == pytest.approx(got)
    with_bg = monai_calibration_errors(p, y, 4, num_bins=10, include_background=True)
    assert (with_bg["ace"], with_bg["mce"]) == pytest.approx(brute_force_monai_ace_mce(p, y, 10, first=0), abs=1e-6)


def test_monai_calibration_errors_hand_computed():
    from monai_nacl.metrics import monai_calibration_errors

    # one volume, 2 classes, 3 voxels; class 1: p = 0.11, 0.14 (bin 2 of 20) with y = 1, 0; p = 0.93 (bin 18), y = 1
    p1 = torch.tensor([0.11, 0.14, 0.93])
    p = torch.stack([1 - p1, p1]).view(1, 2, 3, 1)
    y = torch.tensor([1, 0, 1]).view(1, 1, 3, 1)
    got = monai_calibration_errors(p, y, 2)
    gaps = [abs(0.125 - 0.5), abs(0.93 - 1.0)]
    assert got["ace"] == pytest.approx(np.mean(gaps), abs=1e-6)
    assert got["mce"] == pytest.approx(max(gaps), abs=1e-6)


def test_monai_calibration_errors_bad_input(rng):
    from monai_nacl.metrics import monai_calibration_errors

    p = _probs((1, 4, 4, 4), 3, rng)
    y = torch.randint(0, 3, (1, 1, 4, 4, 4), generator=rng)
    with pytest.raises(ValueError, match="channels"):
        monai_calibration_errors(p, y, 4)
    with pytest.raises(ValueError, match="probabilities"):
        monai_calibration_errors(torch.log(p), y, 3)
    with pytest.raises(ValueError, match="outside"):
        monai_calibration_errors(p, y + 3, 3)
    with pytest.raises(ValueError, match="does not match"):
        monai_calibration_errors(p, y[..., :2], 3)
    with pytest.raises(ValueError, match="num_bins"):
        monai_calibration_errors(p, y, 3, num_bins=0)
    with pytest.raises(ValueError, match="include_background"):
        monai_calibration_errors(p, y, 3, include_background="no")
    with pytest.raises(ValueError, match="num_classes"):
        monai_calibration_errors(torch.ones(1, 1, 4), torch.zeros(1, 1, 4), 1)
    with pytest.raises(ValueError, match="same length"):
        monai_calibration_errors(list(p), [], 3)
    with pytest.raises(ValueError, match="empty sequence"):
        monai_calibration_errors([], [], 3)


def test_monai_calibration_output_feeds_monais_handler_like_the_function():
    from ignite.engine import Engine
    from monai.handlers import CalibrationError

    from monai_nacl.metrics import monai_calibration_errors, monai_calibration_output

    torch.manual_seed(3)
    cases = []
    for _ in range(3):
        prob = torch.softmax(torch.randn(3, 6, 5, 4) * 2, 0)
        cases.append({"prob": prob, "label_index": torch.randint(0, 3, (1, 6, 5, 4))})
    engine = Engine(lambda e, b: b)
    handlers = {}
    for name, reduction in (("ace", "average"), ("mce", "maximum")):
        handlers[name] = CalibrationError(
            num_bins=20,
            include_background=False,
            calibration_reduction=reduction,
            output_transform=monai_calibration_output(3),
        )
        handlers[name].attach(engine, name)
    engine.run([cases[:2], cases[2:]], max_epochs=1)  # two batches of decollated cases
    expected = monai_calibration_errors([c["prob"] for c in cases], [c["label_index"] for c in cases], 3)
    assert engine.state.metrics["ace"] == pytest.approx(expected["ace"], abs=1e-6)
    assert engine.state.metrics["mce"] == pytest.approx(expected["mce"], abs=1e-6)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        monai_calibration_output(3)([{"prob": cases[0]["prob"], "label_index": cases[0]["label_index"] + 1}])
    with pytest.raises(ValueError, match="do not match"):
        monai_calibration_output(4)(cases[:1])
