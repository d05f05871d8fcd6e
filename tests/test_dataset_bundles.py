"""The six dataset bundles of the NACL paper on fixtures in each dataset's real layout: train, calibrate,
evaluate and infer through ConfigWorkflow, zoo-equivalent checks, MONAI Label keys, generator in sync."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import bundle_workflow

from monai_nacl.bundle_check import all_bundles
from monai_nacl.conformal import read_conformal_record
from monai_nacl.data import build_datalist, write_fixture
from monai_nacl.handlers import TemperatureFitHandler
from monai_nacl.temperature import check_calibration_record, read_calibration_record

# bundle workflows, torchrun and script runs: minutes in all; `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# equal-mass ECE and MONAI's class-wise ACE/MCE next to the paper-protocol metrics in evaluate.json
NEW_METRICS = ("val_adaptive_ece", "val_adaptive_cece", "val_ace_monai", "val_mce_monai")


def _dataset_spec(bundle: Path) -> dict | None:
    """What the tests need to know of a dataset bundle, read from its own configs (None: not a dataset bundle)."""
    train = json.loads((bundle / "configs" / "train.json").read_text())
    if train["datalist"].get("_target_") != "monai_nacl.data.build_datalist":
        return None
    infer = json.loads((bundle / "configs" / "inference.json").read_text())
    return {
        "layout": train["datalist"]["dataset"],
        "classes": train["class_names"],
        "label_values": train["label_values"],
        # the segmentation is written in raw label values (BraTS 0/1/2/4) where regions are evaluated
        "regions": infer["output_label_values"] is not None,
        "channels": train["network_def"]["network"]["in_channels"],
        "pixdim": train["pixdim"],
    }


DATASETS = {b.name: spec for b in all_bundles() if (spec := _dataset_spec(b)) is not None}
NAMES = list(DATASETS)
BY_LAYOUT = {spec["layout"]: name for name, spec in DATASETS.items()}

# patches the strides divide, and a narrow network: one CPU epoch in seconds
SMALL = {"acdc": [32, 32, 8], "flare21": [32, 32, 8], "brats19": [32, 32, 16], "msd": [32, 32, 8]}
SMALL.update({"kits19": [32, 32, 8], "mrbrains18": [32, 32, 8]})


def _workflow(name: str, configs, workflow_type: str, **override):
    return bundle_workflow(ROOT / "bundles" / name, configs, workflow_type, **override)


def _tiny(name: str, tmp_path: Path, data: Path) -> dict:
    layout = DATASETS[name]["layout"]
    return {
        "dataset_dir": str(data),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "resume_dir": str(tmp_path / "checkpoints"),
        "patch_size": SMALL[layout],
        "network_def#network#channels": [4, 8, 8, 16, 16],
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
        "train#dataset#num_workers": 0,
        "train#dataloader#num_workers": 0,
        "validate#dataset#num_workers": 0,
        "validate#dataloader#num_workers": 0,
    }


def test_the_six_dataset_bundles_are_found():
    assert sorted(BY_LAYOUT) == ["acdc", "brats19", "flare21", "kits19", "mrbrains18", "msd"]


def test_every_bundle_is_checked_somewhere():
    shipped = {b.name for b in all_bundles() if (b / "models" / "model.pt").is_file()}  # test_bundles.py
    assert {b.name for b in all_bundles()} == shipped | set(DATASETS)
    assert not shipped & set(DATASETS), "dataset bundles ship no weights yet; update their model cards first"


@pytest.mark.parametrize("name", NAMES)
def test_train_calibrate_evaluate_infer_on_layout_fixture(name, tmp_path):
    spec = DATASETS[name]
    data = write_fixture(spec["layout"], tmp_path / "data", num_cases=6, seed=1)
    tiny = _tiny(name, tmp_path, data)

    train = _workflow(name, ["train.json"], "train", **tiny)
    train.run()
    assert check_calibration_record(tmp_path / "models" / "model.pt") == []

    _workflow(name, ["train.json", "calibrate.json"], "train", **tiny).run()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    # [elsewhere, near the predicted foreground]
    assert state["temperature"].shape == (2,) and not torch.equal(state["temperature"], torch.ones(2))
    # both records name the inferer they were fitted through, the one inference uses
    infer_config = json.loads((ROOT / "bundles" / name / "configs" / "inference.json").read_text())
    overlap = [infer_config["inferer"]["overlap"]] * 3
    expected = f"SlidingWindowInferer(roi_size={tiny['patch_size']}, overlap={overlap}, mode=constant"
    for record in (
        read_calibration_record(tmp_path / "models" / "model.pt"),
        read_conformal_record(tmp_path / "models" / "model.pt"),
    ):
        assert record["inferer"].startswith(expected), record["inferer"]
    # one temperature fitted on ground-truth foreground voxels only (the paper's ECE protocol) instead
    # (a bundle used this way from training on: the checkpoints above hold two temperatures)
    one_t = {**tiny, "temperature_mask": "foreground", "network_def#foreground_margin": None}
    one_t["ckpt_dir"] = str(shutil.copytree(tmp_path / "models", tmp_path / "one_t"))  # calibrate needs weights
    fg = _workflow(name, ["train.json", "calibrate.json"], "train", **one_t)
    fitter = next(h for h in fg.parser.get_parsed_content("validate#handlers") if isinstance(h, TemperatureFitHandler))
    fitter = fitter.fitter
    assert fitter.mask == "foreground" and fitter.foreground_margin is None

    evaluate = _workflow(name, ["train.json", "evaluate.json"], "train", **tiny)
    evaluate.run()
    metrics = evaluate.parser.get_parsed_content("validate#evaluator").state.metrics
    for key in ("val_mean_dice", "val_hd95", "val_ece", "val_cece", "val_nll", "val_brier", *NEW_METRICS):
        assert key in metrics
    assert (tmp_path / "eval" / "reliability.png").is_file()

    infer_override = {k: v for k, v in tiny.items() if not k.startswith(("train#", "validate#", "val_"))}
    infer_override["output_dir"] = str(tmp_path / "out")
    infer_override["dataloader#num_workers"] = 0
    infer = _workflow(name, ["inference.json"], "infer", **infer_override)
    infer.run()
    infer.finalize()  # raises if any input failed
    test_images = [item["image"] for item in build_datalist(spec["layout"], data)["test"]]
    assert test_images
    first = test_images[0] if isinstance(test_images[0], str) else test_images[0][0]
    src = nib.load(first)
    stem = Path(first).name.replace(".nii.gz", "")
    seg = nib.load(tmp_path / "out" / f"{stem}_seg.nii.gz")
    prob = nib.load(tmp_path / "out" / f"{stem}_prob.nii.gz")
    entropy = nib.load(tmp_path / "out" / f"{stem}_entropy.nii.gz")
    # outputs are in the original image geometry (KiTS19's permuted axes and anisotropic spacing included)
    for out in (seg, prob, entropy):
        assert out.shape[:3] == src.shape[:3]
        assert np.allclose(out.affine, src.affine, atol=1e-4)
    probs = np.asarray(prob.dataobj)
    assert probs.shape[-1] == len(spec["classes"])
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    values = set(np.unique(np.asarray(seg.dataobj)).astype(int).tolist())
    allowed = set(spec["label_values"]) if spec.get("regions") else set(range(len(spec["classes"])))
    assert values <= allowed
    summary = json.loads((tmp_path / "out" / f"{stem}_summary.json").read_text())
    assert list(summary["structures"]) == spec["classes"][1:]
    raw = np.asarray(seg.dataobj)
    for name_, value in zip(spec["classes"][1:], sorted(allowed)[1:]):
        assert summary["structures"][name_]["voxels"] == int((raw == value).sum())


def test_brats_is_evaluated_on_tumour_regions(tmp_path):
    data = write_fixture("brats19", tmp_path / "data", num_cases=3)
    wf = _workflow(BY_LAYOUT["brats19"], ["train.json"], "train", dataset_dir=str(data))
    post = wf.parser.get_parsed_content("validate#postprocessing")
    label = torch.randint(0, 4, (1, 6, 6, 6))  # training classes 0/1/2/3 = BraTS labels 0/1/2/4
    logits = torch.nn.functional.one_hot(label[0], 4).permute(3, 0, 1, 2).float() * 10
    out = post({"pred": logits, "label": label.clone()})
    tc, wt, et = (label[0] == 1) | (label[0] == 3), label[0] > 0, label[0] == 3
    expected = torch.stack([tc, wt, et]).float()
    assert torch.equal(out["label"].float(), expected) and torch.equal(out["pred"].float(), expected)
    assert torch.equal(out["label_index"], label)  # calibration keeps the four training classes


def test_datalist_check_names_a_bad_case(tmp_path):
    data = write_fixture("kits19", tmp_path / "data", num_cases=3)
    case = build_datalist("kits19", data)["training"][0]["case"]
    seg = data / "data" / case / "segmentation.nii.gz"
    img = nib.load(seg)
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, img.affine), seg)
    with pytest.raises(RuntimeError) as info:  # ConfigWorkflow wraps the check's ValueError
        _workflow(BY_LAYOUT["kits19"], ["train.json"], "train", dataset_dir=str(data))
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert case in str(cause) and "label values [7]" in str(cause)


@pytest.mark.parametrize("name", NAMES)
def test_the_prior_is_cached_in_float16(name, tmp_path):
    from monai.data import MetaTensor

    wf = _workflow(name, ["train.json"], "train", dataset_dir=str(write_fixture(DATASETS[name]["layout"], tmp_path, 6)))
    prior = wf.parser.get_parsed_content("train#prior_transform")
    label = MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.diag(torch.tensor([*DATASETS[name]["pixdim"], 1.0])))
    out = prior({"label": label})["prior"]
    assert out.dtype == torch.float16 and out.shape[0] == len(DATASETS[name]["classes"])
    assert torch.equal(out[0].float(), torch.ones(8, 8, 8))  # all background: tau = 1 for class 0, exactly


@pytest.mark.parametrize("layout", ["flare21", "brats19"])
def test_trains_with_the_prior_on_the_device(layout, tmp_path):
    """``prior_on_device.json`` on a dataset bundle (anisotropic kernel from ``neighborhood_mm``, RandAffined between
    crop and device): nothing C-channel is cached, and every batch reaches the loss with τ of the patch size."""
    from monai.engines.utils import IterationEvents

    name = BY_LAYOUT[layout]
    data = write_fixture(layout, tmp_path / "data", num_cases=6, seed=1)
    tiny = {**_tiny(name, tmp_path, data), "train#dataset#cache_rate": 1.0}
    wf = _workflow(name, ["train.json", "prior_on_device.json"], "train", **tiny)
    cached = wf.parser.get_parsed_content("train#dataset")
    items = [item for item in cached._cache if isinstance(item, dict)]
    assert items and all("prior" not in item and "label" in item for item in items)
    sizes = []

    def check(engine):
        prior = engine.state.batch["prior"]
        sizes.append(list(prior.shape[1:]))
        assert torch.allclose(prior.sum(1), torch.ones_like(prior[:, 0]))

    wf.parser.get_parsed_content("train#trainer").add_event_handler(IterationEvents.FORWARD_COMPLETED, check)
    wf.run()
    classes = len(DATASETS[name]["classes"])
    assert sizes and all(s == [classes, *SMALL[layout]] for s in sizes)
    assert check_calibration_record(tmp_path / "models" / "model.pt") == []
