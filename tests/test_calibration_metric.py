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
    out[rank] = [m.aggregate("micro"), m.aggregate("macro")]
    dist.destroy_process_group()


def test_distributed_all_reduce_two_processes(rng):
    p = _probs((2, 6, 6, 6), 3, rng)
    y = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=rng)
    single = CalibrationMetric(3, mask="foreground")
    single(p, y)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), p, y, out), nprocs=2, join=True)
    for rank in range(2):
        micro, macro = out[rank]
        assert micro == pytest.approx(single.aggregate("micro"))
        assert macro == pytest.approx(single.aggregate("macro"))
