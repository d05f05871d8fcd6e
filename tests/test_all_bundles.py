"""Checks every bundle passes, each one test parametrised over the bundles: the Model Zoo's checks, inference
preprocessing under MONAI Label's extra keys, and multi-GPU training under torchrun (CPU, gloo). Each bundle gets
the data it runs on: generated phantoms, the real Hippocampus cases, or fixtures in a dataset's file layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HIPPOCAMPUS, bundle_workflow, torchrun_bundle

from monai_nacl.bundle_check import all_bundles, check_bundle
from monai_nacl.conformal import check_conformal_record, read_conformal_record
from monai_nacl.data import build_datalist, load_datalist, phantom_datalist, write_fixture
from monai_nacl.temperature import check_calibration_record, read_calibration_record

# bundle workflows, the zoo's export and torchrun: minutes in all; `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

BUNDLES = {b.name: b for b in all_bundles()}
PHANTOM, HIPPO, PROSTATE = (
    "phantom_nacl_segmentation",
    "hippocampus_mri_nacl_segmentation",
    "prostate_mri_nacl_segmentation",
)


def _train_config(name: str) -> dict:
    return json.loads((BUNDLES[name] / "configs" / "train.json").read_text())


def _layout(name: str) -> str | None:
    """The dataset layout a bundle reads (``build_datalist``), None for the phantom and Hippocampus bundles."""
    datalist = _train_config(name)["datalist"]
    return datalist.get("dataset") if datalist.get("_target_") == "monai_nacl.data.build_datalist" else None


def _data(name: str, tmp_path: Path) -> tuple[Path | None, str]:
    """``(dataset_dir, one image path)`` for a bundle; for the phantom bundle no folder (the zoo check lets it write
    its phantoms where it always does) and an image of phantoms written under ``tmp_path``."""
    if name == PHANTOM:
        item = phantom_datalist(tmp_path / "data", 2, 2, 1)["test"][0]
        return None, item["image"]
    if name == HIPPO:
        if not (HIPPOCAMPUS / "dataset.json").is_file():
            pytest.skip(f"{name} needs MSD Task04 Hippocampus at {HIPPOCAMPUS} (set MONAI_NACL_HIPPOCAMPUS)")
        datalist = load_datalist(BUNDLES[name] / "configs" / "datalist.json", HIPPOCAMPUS)
        return HIPPOCAMPUS, datalist["test"][0]["image"]
    # 6 cases: ACDC's two frames per patient still leave a patient for validation (an empty split is an error)
    data = write_fixture(_layout(name), tmp_path / "data", num_cases=6)
    return data, build_datalist(_layout(name), data)["training"][0]["image"]


def test_every_bundle_is_covered():
    assert len(BUNDLES) == 8 and {PHANTOM, HIPPO, PROSTATE} <= set(BUNDLES)
    assert sum(_layout(n) is not None for n in BUNDLES) == 6


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_zoo_checks_pass(name, tmp_path):
    data, _ = _data(name, tmp_path)
    assert check_bundle(BUNDLES[name], dataset_dir=data) == []


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_inference_preprocessing_survives_monai_label_keys(name, tmp_path):
    data, image = _data(name, tmp_path)
    override = {"dataset_dir": str(data if data is not None else tmp_path / "data")}
    wf = bundle_workflow(BUNDLES[name], ["inference.json"], "infer", **override)
    pre = wf.parser.get_parsed_content("preprocessing")
    # MONAI Label adds string entries such as image_path next to the image; Spacingd alone crashes on them
    out = pre({"image": image, "image_path": str(image), "label_path": "none", "model": "x"})
    train = _train_config(name)
    assert out["image"].shape[0] == train["network_def"]["network"]["in_channels"]
    assert out["image_path"] == str(image)
    if _layout(name) is not None:  # the dataset bundles resample to their target spacing
        assert np.allclose(out["image"].pixdim.tolist(), train["pixdim"], atol=1e-3)


def _torchrun_overrides(name: str, tmp_path: Path) -> dict:
    common = {
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "resume_dir": str(tmp_path / "checkpoints"),
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
    }
    if name == PHANTOM:  # the validation sampler needs a case per rank
        return {**common, "dataset_dir": str(tmp_path / "data"), "num_train": 2, "num_val": 2, "num_test": 1}
    if name == HIPPO:
        if not (HIPPOCAMPUS / "dataset.json").is_file():
            pytest.skip(f"{name} needs MSD Task04 Hippocampus at {HIPPOCAMPUS} (set MONAI_NACL_HIPPOCAMPUS)")
        full = json.loads((BUNDLES[name] / "configs" / "datalist.json").read_text())
        small = {"training": full["training"][:2], "validation": full["validation"][:2], "test": full["test"][:1]}
        (tmp_path / "datalist.json").write_text(json.dumps(small))
        return {**common, "dataset_dir": str(HIPPOCAMPUS), "datalist#datalist_file": str(tmp_path / "datalist.json")}
    data = write_fixture(_layout(name), tmp_path / "data", num_cases=8)
    return {
        **common,
        "dataset_dir": str(data),
        "datalist#fractions": [0.5, 0.25, 0.25],  # a validation case per rank
        "patch_size": [32, 32, 8],
        "network_def#network#channels": [4, 8, 8, 16, 16],
        "train#dataset#num_workers": 0,
        "train#dataloader#num_workers": 0,
        "validate#dataset#num_workers": 0,
        "validate#dataloader#num_workers": 0,
    }


@pytest.mark.parametrize("name", [PHANTOM, HIPPO, PROSTATE])
def test_multi_gpu_training_with_torchrun_on_cpu(name, tmp_path):
    result = torchrun_bundle(BUNDLES[name], ["train.json", "multi_gpu_train.json"], _torchrun_overrides(name, tmp_path))
    # rank 0 wrote the best model, calibrated for its own weights; the finished run left no resume checkpoint
    assert check_calibration_record(tmp_path / "models" / "model.pt") == []
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert "val_ece" in result.stdout + result.stderr


def test_multi_gpu_calibrate_with_torchrun_on_cpu(tmp_path):
    """calibrate.json with multi_gpu_calibrate.json on two processes refits the temperatures of a copy of the shipped
    phantom model on all the validation cases, then fits the conformal record after them (rank 0 writes both)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("model.pt", "model.calibration.json", "model.conformal.json"):
        shutil.copy2(BUNDLES[PHANTOM] / "models" / name, models / name)
    shipped = read_conformal_record(models / "model.pt")
    overrides = {
        "ckpt_dir": str(models),
        "output_dir": str(tmp_path / "eval"),
        "resume_dir": str(tmp_path / "checkpoints"),
        "dataset_dir": str(tmp_path / "data"),
        "num_train": 1,
        "num_val": 5,  # DistributedSampler(even_divisible=False): 3 cases on rank 0, 2 on rank 1
        "num_test": 1,
    }
    configs = ["train.json", "calibrate.json", "multi_gpu_calibrate.json"]
    torchrun_bundle(BUNDLES[PHANTOM], configs, overrides)
    model = models / "model.pt"
    assert check_calibration_record(model) == []
    assert check_conformal_record(model) == []  # fitted after the new temperatures, for these weights
    record, calibration = read_conformal_record(model), read_calibration_record(model)
    assert record["cases"] == 5 and record["cases"] != shipped["cases"]  # both ranks' cases, a fresh record
    assert calibration["fitted_by"] == "TemperatureFitHandler" and calibration["volumes"] == 5
    temperature = torch.load(model, weights_only=True)["temperature"]
    assert record["temperature"] == pytest.approx(temperature.tolist())
    assert record["temperature"] == pytest.approx(calibration["temperature"])
