"""Calibrated weights on disk: the record beside model.pt, and what happens when weights and T drift apart."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import UNet

from monai_nacl.temperature import (
    TemperatureScaled,
    check_calibration_record,
    read_calibration_record,
    record_path,
    save_calibrated,
    weights_fingerprint,
)


def _net():
    return TemperatureScaled(UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1), foreground_margin=1)


def test_save_and_check_round_trip(tmp_path):
    net = _net()
    net.set_temperature(torch.tensor([0.8, 1.9]))
    record = save_calibrated(net.state_dict(), tmp_path / "model.pt", voxels=123, fitted_by="test")
    assert record_path(tmp_path / "model.pt") == tmp_path / "model.calibration.json"
    stored = read_calibration_record(tmp_path / "model.pt")
    assert stored == json.loads(json.dumps(record))
    assert stored["weights_fingerprint"] == f"{weights_fingerprint(net):016x}"
    assert stored["temperature"] == pytest.approx([0.8, 1.9]) and stored["voxels"] == 123
    assert check_calibration_record(tmp_path / "model.pt") == []
    # the state_dict and the module agree on the fingerprint, whatever the device or copy
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert weights_fingerprint(state) == weights_fingerprint(net) == int(state["calibrated_for"])


def test_stale_temperature_is_never_written(tmp_path):
    net = _net()
    net.set_temperature(torch.tensor([0.8, 1.9]))
    with torch.no_grad():
        next(net.network.parameters()).mul_(1.01)  # weights changed after the fit (fine-tuning)
    with pytest.raises(ValueError, match="model.pt: the temperature in this state_dict was set for other weights"):
        save_calibrated(net.state_dict(), tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists() and not record_path(tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="TemperatureScaled state_dict"):
        save_calibrated(net.network.state_dict(), tmp_path / "model.pt")


def test_check_names_every_mismatch(tmp_path):
    net = _net()
    net.set_temperature(torch.tensor([0.8, 1.9]))
    path = tmp_path / "model.pt"
    save_calibrated(net.state_dict(), path)
    # weights overwritten by a plain save of fine-tuned weights that kept the old T and record
    with torch.no_grad():
        next(net.network.parameters()).add_(0.5)
    torch.save(net.state_dict(), path)
    problems = check_calibration_record(path)
    assert any("temperature fitted for weights" in p for p in problems)
    assert any("written for weights" in p for p in problems)
    # never calibrated, no record
    fresh = tmp_path / "fresh.pt"
    torch.save(_net().state_dict(), fresh)
    problems = check_calibration_record(fresh)
    assert any("no record of the weights" in p for p in problems) and any("missing" in p for p in problems)
    # temperatures edited in the record
    net.set_temperature(torch.tensor([0.8, 1.9]))
    save_calibrated(net.state_dict(), path)
    rec = json.loads(record_path(path).read_text())
    rec["temperature"] = [1.0, 1.0]
    record_path(path).write_text(json.dumps(rec))
    assert any("temperature [1.0, 1.0]" in p for p in check_calibration_record(path))
    # unreadable files are named
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot be read as weights"):
        check_calibration_record(tmp_path / "bad.pt")
    record_path(path).write_text("{truncated")
    with pytest.raises(ValueError, match="model.calibration.json: not a valid calibration record"):
        read_calibration_record(path)


def test_warn_if_not_calibrated(tmp_path):
    from monai_nacl.temperature import StaleTemperatureWarning, warn_if_not_calibrated

    net = _net()
    net.set_temperature(torch.tensor([0.8, 1.9]))
    save_calibrated(net.state_dict(), tmp_path / "model.pt")
    assert warn_if_not_calibrated(tmp_path / "model.pt") == []
    torch.save(_net().state_dict(), tmp_path / "model.pt")  # overwritten by uncalibrated weights
    with pytest.warns(StaleTemperatureWarning, match="no record of the weights"):
        assert warn_if_not_calibrated(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt not found"):
        warn_if_not_calibrated(tmp_path / "absent.pt")
    assert warn_if_not_calibrated(tmp_path / "absent.pt", missing_ok=True) == [f"{tmp_path / 'absent.pt'}: not found"]


def test_record_is_strict_json(tmp_path):
    net = _net()
    net.set_temperature(torch.tensor([0.8, 1.9]))
    save_calibrated(net.state_dict(), tmp_path / "model.pt", metric={"val_mean_dice": float("nan")})
    text = record_path(tmp_path / "model.pt").read_text()
    assert "NaN" not in text and json.loads(text)["metric"] == {"val_mean_dice": None}


def test_inference_dataset_refuses_worker_processes(tmp_path):
    from monai.data import DataLoader

    from monai_nacl.data import InferenceDataset

    ds = InferenceDataset([{"image": "a"}, {"image": "b"}], transform=None)
    assert [d["image"] for d in DataLoader(ds, batch_size=1, num_workers=0)] == [["a"], ["b"]]
    with pytest.raises(RuntimeError, match="num_workers=0"):
        list(DataLoader(ds, batch_size=1, num_workers=1))
