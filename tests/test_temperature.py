from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import UNet

from monai_nacl.metrics import CalibrationMetric
from monai_nacl.temperature import TemperatureFitter, TemperatureScaled, fit_temperature


def _calibrated_toy(rng, n=4, c=3, size=16):
    """Labels drawn from softmax(z): z is perfectly calibrated by construction."""
    z = torch.randn(n, c, size, size, size, generator=rng) * 2.0
    p = torch.softmax(z, 1)
    flat = p.movedim(1, -1).reshape(-1, c)
    y = torch.multinomial(flat, 1, generator=rng).view(n, size, size, size)[:, None]
    return z, y


def _metrics(z, y):
    m = CalibrationMetric(z.shape[1])
    m(torch.softmax(z, 1), y)
    return m.aggregate("micro")


@pytest.mark.parametrize("per_class", [False, True])
def test_overconfident_logits_recover_temperature_five(per_class, rng):
    z, y = _calibrated_toy(rng)
    fitter = TemperatureFitter(3, per_class=per_class, voxels_per_volume=3000)
    fitter.update(z * 5, y)
    t = fitter.fit()
    assert t.shape == ((3,) if per_class else (1,))
    assert torch.all((t - 5).abs() / 5 < 0.10), t
    before, after = _metrics(z * 5, y), _metrics(z * 5 / t.view(1, -1, 1, 1, 1), y)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert fitter.samples()[0].shape[0] == 4 * 3000  # bounded sample, not every voxel


def test_fit_is_bounded(rng):
    z, y = _calibrated_toy(rng, n=1)
    fitter = TemperatureFitter(3)
    fitter.update(z * 1e4, y)  # absurdly overconfident: optimum above T_MAX
    assert fitter.fit().item() == pytest.approx(20.0, rel=1e-3)


class _Identity(nn.Module):
    def forward(self, x):
        return x


def test_fit_temperature_composes_with_existing_temperature(rng):
    z, y = _calibrated_toy(rng, n=2)
    net = TemperatureScaled(_Identity(), temperature=2.0)
    net.register_parameter("dummy", nn.Parameter(torch.zeros(1)))
    data = [{"image": z[i : i + 1] * 5, "label": y[i : i + 1]} for i in range(2)]
    total = fit_temperature(net, data, num_classes=3)
    assert total.item() == pytest.approx(5.0, rel=0.1)  # 2 already applied, correction ~2.5
    net.set_temperature(total)
    assert _metrics(net.eval()(z * 5), y)["nll"] < _metrics(z * 5 / 2, y)["nll"]


def test_wrapper_state_dict_torchscript_and_dropout():
    unet = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
    net = TemperatureScaled(unet, num_classes=3, per_class=True, dropout=0.2)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.2 for m in dropouts)
    net.set_temperature(torch.tensor([1.5, 2.0, 3.0]))
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert torch.equal(state["temperature"], torch.tensor([1.5, 2.0, 3.0]))
    fresh = TemperatureScaled(UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1), 3, per_class=True)
    fresh.load_state_dict(state)
    fresh.eval()
    x = torch.randn(1, 1, 8, 8, 8)
    expected = fresh.network(x) / torch.tensor([1.5, 2.0, 3.0]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(fresh(x), expected)
    scripted = torch.jit.script(fresh)
    torch.testing.assert_close(scripted(x), expected)


def test_bad_temperatures_and_inputs():
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaled(_Identity(), temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        TemperatureScaled(_Identity(), per_class=True)
    with pytest.raises(ValueError, match="no voxel to fit on"):
        TemperatureFitter(3).fit()
    # volumes seen, but none has an eligible voxel: an error, not the bound T_MAX
    only_background = TemperatureFitter(3, mask="foreground")
    only_background.update(torch.randn(2, 3, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="2 volume.*none with an eligible voxel.*foreground"):
        only_background.fit()
    with pytest.raises(ValueError, match="NaN"):
        TemperatureFitter(3).update(torch.full((1, 3, 2, 2, 2), float("nan")), torch.zeros(1, 1, 2, 2, 2))


def test_compose_temperature_multiplies_and_clamps():
    from monai_nacl.temperature import T_MAX, T_MIN, compose_temperature

    assert torch.allclose(compose_temperature(torch.tensor([2.0]), torch.tensor([1.5])), torch.tensor([3.0]))
    assert compose_temperature(torch.tensor([10.0]), torch.tensor([5.0])).item() == T_MAX
    assert compose_temperature(torch.tensor([0.1]), torch.tensor([0.1])).item() == pytest.approx(T_MIN)
    per_class = compose_temperature(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(per_class, torch.tensor([2.0, 2.0, 2.0]))


def test_near_foreground_dilates_the_predicted_foreground():
    from monai_nacl.temperature import near_foreground

    logits = torch.zeros(1, 3, 7, 7, 7)
    logits[:, 0] = 1.0
    logits[0, 2, 3, 3, 3] = 5.0  # one voxel predicted as class 2
    assert near_foreground(logits, 0).sum() == 1
    near = near_foreground(logits, 1)
    assert near.shape == (1, 1, 7, 7, 7) and near.sum() == 27 and near[0, 0, 2:5, 2:5, 2:5].all()
    assert torch.equal(near_foreground(logits / 3.0, 2), near_foreground(logits, 2))  # temperature-free
    assert near_foreground(logits[..., 3], 1).sum() == 9  # 2D


def _two_region_toy(rng, margin=1, t_near=2.5, size=24):
    """Calibrated logits everywhere, then made over-confident by ``t_near`` near the predicted foreground."""
    z = torch.randn(3, 3, size, size, size, generator=rng)
    z[:, 0] += 3.0
    c = slice(size // 3, 2 * size // 3)
    z[:, 0, c, c, c] -= 4.0  # a structure of classes 1/2 in the middle
    p = torch.softmax(z, 1).movedim(1, -1).reshape(-1, 3)
    y = torch.multinomial(p, 1, generator=rng).view(3, 1, size, size, size)
    from monai_nacl.temperature import near_foreground

    near = near_foreground(z, margin)
    return torch.where(near, z * t_near, z), y, near


def test_two_region_fit_recovers_each_temperature(rng):
    z, y, near = _two_region_toy(rng)
    fitter = TemperatureFitter(3, foreground_margin=1, voxels_per_volume=4000)
    fitter.update(z, y)
    t = fitter.fit()
    assert t.shape == (2,)
    assert abs(t[0] - 1.0) < 0.1 and abs(t[1] - 2.5) / 2.5 < 0.1, t
    # each region is sampled on its own: the small near-foreground region is not drowned by the rest
    assert int(torch.cat(fitter._regions).sum()) == 3 * 4000
    # one global T cannot do both: it lands in between and leaves the near region over-confident
    glob = TemperatureFitter(3, voxels_per_volume=8000)
    glob.update(z, y)
    assert 1.0 < glob.fit().item() < 2.0

    net = TemperatureScaled(_Identity(), foreground_margin=1).eval()
    net.set_temperature(t)
    scaled = net(z)
    torch.testing.assert_close(scaled, torch.where(near, z / t[1], z / t[0]))
    assert torch.equal(scaled.argmax(1), z.argmax(1))
    # ECE over the voxels near the structure (the others ignored) and over all voxels
    y_near = torch.where(near, y, torch.full_like(y, 255))
    ece = {}
    for name, logits in (("two", scaled), ("global", z / glob.fit().item())):
        for region, labels in (("near", y_near), ("all", y)):
            m = CalibrationMetric(3, ignore_index=255)
            m(torch.softmax(logits, 1), labels)
            ece[name, region] = m.aggregate("micro")["ece"]
    assert ece["two", "near"] < 0.5 * ece["global", "near"], ece
    assert ece["two", "all"] < ece["global", "all"], ece


def test_two_region_wrapper_loads_single_temperature_and_scripts():
    unet = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
    old = TemperatureScaled(unet, temperature=1.7).state_dict()
    net = TemperatureScaled(UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1), foreground_margin=2)
    net.load_state_dict(old)
    assert torch.equal(net.temperature, torch.tensor([1.7, 1.7]))
    net.set_temperature(torch.tensor([0.8, 2.0]))
    one_t = TemperatureScaled(UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1))
    with pytest.raises(RuntimeError, match="calibrated with foreground_margin set"):
        one_t.load_state_dict(net.state_dict())
    net.eval()
    x = torch.randn(1, 1, 8, 8, 8)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))
    with pytest.raises(ValueError, match="cannot be combined"):
        TemperatureScaled(_Identity(), num_classes=3, per_class=True, foreground_margin=1)
    with pytest.raises(ValueError, match="non-negative integer"):
        TemperatureScaled(_Identity(), foreground_margin=-1)
    with pytest.raises(ValueError, match="mask='all'"):
        TemperatureFitter(3, mask="foreground", foreground_margin=1)


def test_fit_temperature_and_handler_follow_the_network_margin(rng):
    from monai_nacl.handlers import TemperatureFitHandler

    z, y, _ = _two_region_toy(rng, size=16)
    net = TemperatureScaled(_Identity(), foreground_margin=1, temperature=2.0)
    net.register_parameter("dummy", nn.Parameter(torch.zeros(1)))
    data = [{"image": z[i : i + 1], "label": y[i : i + 1]} for i in range(3)]
    total = fit_temperature(net, data, num_classes=3)
    assert total.shape == (2,) and abs(total[0] - 1.0) < 0.15 and abs(total[1] - 2.5) / 2.5 < 0.15, total
    with pytest.raises(ValueError, match="differs from the network"):
        TemperatureFitHandler(net, num_classes=3, foreground_margin=3)
    assert TemperatureFitHandler(net, num_classes=3).fitter.foreground_margin == 1


def _small_unet():
    return UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)


def test_temperature_applies_in_eval_mode_only():
    net = TemperatureScaled(_small_unet(), temperature=2.0)
    x = torch.randn(1, 1, 8, 8, 8)
    net.train()
    torch.testing.assert_close(net(x), net.network(x))  # training optimises the raw logits
    net.eval()
    torch.testing.assert_close(net(x), net.network(x) / 2.0)


def test_stale_temperature_warns_on_load():
    from monai_nacl.temperature import StaleTemperatureWarning, weights_fingerprint

    net = TemperatureScaled(_small_unet(), foreground_margin=1)
    assert int(net.calibrated_for) == 0 and not net.is_calibrated_for_current_weights()
    net.set_temperature(torch.tensor([0.9, 1.8]))
    assert int(net.calibrated_for) == weights_fingerprint(net) == weights_fingerprint(net.network)
    assert net.is_calibrated_for_current_weights()
    calibrated = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = TemperatureScaled(_small_unet(), foreground_margin=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(calibrated)  # the weights the temperature was fitted for: silent
    assert fresh.is_calibrated_for_current_weights()
    # fine-tuned weights that kept the old temperature
    with torch.no_grad():
        next(net.network.parameters()).add_(0.01)
    assert not net.is_calibrated_for_current_weights()
    with pytest.warns(StaleTemperatureWarning, match="fitted for other weights"):
        fresh.load_state_dict(net.state_dict())
    # a state_dict saved before fingerprints existed loads, without a verdict
    legacy = {k: v for k, v in calibrated.items() if k != "calibrated_for"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(legacy)
    assert int(fresh.calibrated_for) == 0


def test_loaded_temperatures_are_checked():
    net = TemperatureScaled(_small_unet())
    state = net.state_dict()
    for bad, match in ((0.0, "finite and in"), (-1.5, "finite and in"), (float("nan"), "finite and in")):
        with pytest.raises(RuntimeError, match=match):
            net.load_state_dict({**state, "temperature": torch.tensor([bad])})
    with pytest.raises(RuntimeError, match="floating-point"):
        net.load_state_dict({**state, "temperature": torch.tensor([2])})
    assert torch.equal(net.temperature, torch.ones(1))


def test_bare_network_state_dict_is_named():
    net = TemperatureScaled(_small_unet())
    with pytest.raises(RuntimeError, match="state_dict of a bare network.*wrapper.network.load_state_dict"):
        net.load_state_dict(_small_unet().state_dict())
    with pytest.raises(ValueError, match="1 or 2 values"):
        TemperatureScaled(_small_unet(), foreground_margin=1).set_temperature(torch.ones(3))


def test_fitter_score_matches_calibration_metric(rng):
    z, y = _calibrated_toy(rng, n=2, size=40)
    fitter = TemperatureFitter(3, voxels_per_volume=10**6)
    fitter.update(z * 3, y)
    zs, ys = fitter.samples()
    assert zs.shape[0] % ((1 << 18) // 3) > 0  # 1 x 3 x 128000: the metric's CPU blocks end in a shorter one
    metric = CalibrationMetric(3, mask="all")
    metric(torch.softmax(zs, 1).T[None], ys[None, None])  # non-contiguous B,C,N view of the sample
    expected = metric.aggregate("micro")["ece"]
    assert fitter.score()["ece"] == pytest.approx(expected, abs=1e-6, rel=0)  # one ECE definition
    # and the definition itself: 15 equal-width bins of the (float32) top-label confidence, summed in float64
    conf, pred = torch.softmax(zs, 1).max(1)
    bins = (conf * 15).long().clamp(max=14)
    gap = torch.zeros(15, dtype=torch.float64).index_add_(0, bins, (pred == ys).double() - conf.double())
    assert fitter.score()["ece"] == pytest.approx(float(gap.abs().sum() / len(ys)), abs=1e-6, rel=0)
    correction = fitter.fit()
    t = correction.view(1, -1)
    assert fitter.score(correction)["ece"] == pytest.approx(
        _metrics(zs.T[None] / t.T[None], ys[None, None])["ece"], abs=1e-6, rel=0
    )
    assert fitter.score(correction)["nll"] < fitter.score()["nll"]
    assert fitter.score(correction)["ece"] < fitter.score()["ece"]


def test_handlers_fit_the_form_of_the_network():
    from monai_nacl.handlers import CalibratedModelSaver, TemperatureFitHandler

    per_class = TemperatureScaled(_small_unet(), num_classes=3, per_class=True)
    assert TemperatureFitHandler(per_class, num_classes=3).fitter.per_class
    assert CalibratedModelSaver("unused", per_class, num_classes=3).fitter.per_class
    two = TemperatureScaled(_small_unet(), foreground_margin=1)
    assert not TemperatureFitHandler(two, num_classes=3).fitter.per_class
    # MC-dropout sampling (train mode, no gradients) keeps the temperature
    net = TemperatureScaled(_small_unet(), temperature=2.0).train()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.network(x) / 2.0)


def test_fingerprint_unwraps_data_parallel_only():
    from monai_nacl.temperature import weights_fingerprint

    net = TemperatureScaled(_small_unet())
    assert weights_fingerprint(nn.DataParallel(net)) == weights_fingerprint(net)

    class Holder(nn.Module):  # a child called "module" is part of the weights, not a wrapper
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 2)

    h = Holder()
    before = weights_fingerprint(h)
    with torch.no_grad():
        h.head.weight.add_(1.0)
    assert weights_fingerprint(h) != before


def test_best_model_snapshot_keeps_dynunet_aliasing(tmp_path):
    """DynUNet registers each block under two names; the saver's copy shares them, so model.pt is not twice the
    size of the weights, and the copy is independent of the training network."""
    from monai.networks.nets import DynUNet

    from monai_nacl.handlers.model_saver import _snapshot

    net = DynUNet(3, 1, 3, [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[2, 2, 2]] * 2, filters=[4, 8, 16])
    state = net.state_dict()
    copy = _snapshot(state)
    assert copy.keys() == state.keys() and all(torch.equal(copy[k], state[k]) for k in state)
    torch.save(state, tmp_path / "live.pt")
    torch.save(copy, tmp_path / "copy.pt")
    naive = {k: v.detach().clone() for k, v in state.items()}
    torch.save(naive, tmp_path / "naive.pt")
    live, snap, doubled = ((tmp_path / f"{n}.pt").stat().st_size for n in ("live", "copy", "naive"))
    assert snap <= 1.05 * live and doubled > 1.5 * snap  # the aliasing this guards exists
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert not torch.equal(next(iter(copy.values())), next(net.parameters()))
