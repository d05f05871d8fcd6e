"""Bundle workflows through MONAI's ConfigWorkflow on tiny data, zoo-equivalent checks, multi-GPU (CPU, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import bundle_workflow, tiny_bundle_overrides
from ignite.engine import Events
from monai.bundle import ConfigParser

from monai_nacl.handlers import PriorFromBatch
from monai_nacl.temperature import check_calibration_record

# bundle workflows, torchrun and script runs: minutes in all; `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# equal-mass ECE and MONAI's class-wise ACE/MCE next to the paper-protocol metrics in evaluate.json
NEW_METRICS = ("val_adaptive_ece", "val_adaptive_cece", "val_ace_monai", "val_mce_monai")
QUICKSTART = ROOT / "bundles" / "phantom_nacl_segmentation"


_tiny = tiny_bundle_overrides
_workflow = bundle_workflow


HIPPO_DATA = Path(os.environ.get("MONAI_NACL_HIPPOCAMPUS", ROOT.parent / "shared" / "data" / "hippocampus"))


def test_train_evaluate_infer_workflows(tmp_path):
    from monai_nacl.temperature import check_calibration_record, read_calibration_record

    tiny = _tiny(tmp_path)
    train = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    train.run()
    train.finalize()
    model = tmp_path / "models" / "model.pt"
    assert model.is_file()
    # the best model is written with a temperature fitted for its own weights, and says so
    assert check_calibration_record(model) == []
    record = read_calibration_record(model)
    assert record["epoch"] == 1 and "val_mean_dice" in record["metric"] and record["voxels"] > 0
    fitted = torch.load(model, weights_only=True)["temperature"]
    assert fitted.shape == (2,) and not torch.equal(fitted, torch.ones(2))  # elsewhere / near the structures
    # a completed run leaves no resume checkpoint, and none in the model folder
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.calibration.json", "model.pt"]

    evaluate = _workflow(QUICKSTART, ["train.json", "evaluate.json"], "train", **tiny)
    evaluate.run()
    metrics = evaluate.parser.get_parsed_content("validate#evaluator").state.metrics
    for key in ("val_mean_dice", "val_hd95", "val_ece", "val_cece", "val_nll", "val_brier", *NEW_METRICS):
        assert key in metrics
    assert (tmp_path / "eval" / "reliability.png").is_file()
    assert (tmp_path / "eval" / "val_ece_raw.csv").is_file()

    before = torch.load(model, weights_only=True)["temperature"]
    calibrate = _workflow(QUICKSTART, ["train.json", "calibrate.json"], "train", **tiny)
    calibrate.run()
    state = torch.load(model, weights_only=True)
    # the training run already fitted T on the same validation pass: refitting agrees
    torch.testing.assert_close(state["temperature"], before, rtol=1e-3, atol=0)
    assert check_calibration_record(model) == []
    assert read_calibration_record(model)["fitted_by"] == "TemperatureFitHandler"
    from monai_nacl.conformal import check_conformal_record, read_conformal_record

    assert check_conformal_record(model) == []  # fitted after the temperatures, for these weights
    assert read_conformal_record(model)["fitted_by"] == "ConformalFitHandler"

    infer = _workflow(
        QUICKSTART,
        ["inference.json"],
        "infer",
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
        dataset_dir=str(tmp_path / "data"),
    )
    infer.run()
    infer.finalize()
    case = "phantom_2000_40x40x40"
    seg = nib.load(tmp_path / "out" / f"{case}_seg.nii.gz")
    prob = nib.load(tmp_path / "out" / f"{case}_prob.nii.gz")
    ent = nib.load(tmp_path / "out" / f"{case}_entropy.nii.gz")
    src = nib.load(tmp_path / "data" / "imagesTr" / f"{case}.nii.gz")
    assert seg.shape == src.shape and ent.shape == src.shape and prob.shape == (*src.shape, 4)
    assert (abs(seg.affine - src.affine) < 1e-5).all()
    summary = json.loads((tmp_path / "out" / f"{case}_summary.json").read_text())
    labels = np.asarray(seg.dataobj)
    for value, name in enumerate(("core", "shell", "cap"), start=1):
        s = summary["structures"][name]
        assert s["voxels"] == int((labels == value).sum())
        assert s["volume_ml"] == pytest.approx(s["voxels"] / 1000.0)  # 1 mm voxels
        if s["voxels"]:
            assert 0.0 <= s["mean_entropy"] <= 1.0 and 0.0 < s["mean_max_probability"] <= 1.0
    # conformal outputs from the record calibrate.json wrote: masks in the input geometry, intervals per structure
    inner = np.asarray(nib.load(tmp_path / "out" / f"{case}_inner.nii.gz").dataobj)
    outer = np.asarray(nib.load(tmp_path / "out" / f"{case}_outer.nii.gz").dataobj)
    assert inner.shape == outer.shape == (*src.shape, 3) and inner.dtype == outer.dtype == np.uint8
    assert set(np.unique(outer).tolist()) <= {0, 1}
    import csv

    with open(tmp_path / "out" / "volume_intervals.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if case in r["image"]]
    assert [r["structure"] for r in rows] == ["core", "shell", "cap"]
    for r in rows:
        assert float(r["low_ml"]) <= float(r["expected_volume_ml"]) <= float(r["high_ml"])


def test_training_killed_mid_epoch_resumes_with_its_best_model_state(tmp_path):
    from monai_nacl.temperature import read_calibration_record

    tiny = {**_tiny(tmp_path), "train#trainer#max_epochs": 3}
    first = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    trainer = first.parser.get_parsed_content("train#trainer")

    def kill(engine):
        if engine.state.epoch == 3:
            raise KeyboardInterrupt("simulated kill in epoch 3")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, kill)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("train_checkpoint_*.pt"))
    assert saved == ["train_checkpoint_2.pt"]  # older ones pruned
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert not list((tmp_path / "models").glob("train_checkpoint_*"))  # never among the models
    best = first.parser.get_parsed_content("validate#model_saver").state_dict()
    assert best["best_metric"] == read_calibration_record(tmp_path / "models" / "model.pt")["metric"]["val_mean_dice"]

    second = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    trainer2 = second.parser.get_parsed_content("train#trainer")
    saver2 = second.parser.get_parsed_content("validate#model_saver")
    resumed = {}
    trainer2.add_event_handler(
        Events.EPOCH_STARTED(once=3), lambda e: resumed.update(epoch=e.state.epoch, **saver2.state_dict())
    )
    second.run()
    # continued in epoch 3 with the best metric of the first run: a worse epoch cannot replace its model
    assert resumed == {"epoch": 3, **best}
    assert trainer2.state.epoch == 3
    assert saver2.best_metric >= best["best_metric"]
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # complete: removed


def test_checkpoint_past_max_epochs_is_an_error(tmp_path):
    tiny = {**_tiny(tmp_path), "train#trainer#max_epochs": 3}
    first = _workflow(QUICKSTART, ["train.json"], "train", **tiny)

    def kill(engine):
        raise KeyboardInterrupt("simulated kill")

    first.parser.get_parsed_content("train#trainer").add_event_handler(Events.EPOCH_STARTED(once=3), kill)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert (tmp_path / "checkpoints" / "train_checkpoint_2.pt").is_file()
    second = _workflow(QUICKSTART, ["train.json"], "train", **{**tiny, "train#trainer#max_epochs": 1})
    with pytest.raises(RuntimeError) as err:
        second.run()
    assert "train_checkpoint_2.pt is at epoch 2, past max_epochs=1" in str(err.value.__cause__)


def test_monai_label_style_fine_tune_recalibrates(tmp_path):
    """What MONAI Label's BundleTrainTask does: data given as train#dataset#data / validate#dataset#data (the
    bundle's own dataset_dir absent), a CheckpointLoader of model.pt inserted first in train#handlers, a short
    max_epochs. The fine-tuned model.pt must carry a temperature fitted for its new weights."""
    from monai.bundle import ConfigWorkflow

    from monai_nacl.data import phantom_datalist
    from monai_nacl.temperature import check_calibration_record, read_calibration_record

    tiny = _tiny(tmp_path)
    _workflow(QUICKSTART, ["train.json"], "train", **tiny).run()
    model = tmp_path / "models" / "model.pt"
    old = read_calibration_record(model)

    data = phantom_datalist(tmp_path / "label_data", 2, 1, 0)
    handlers = json.loads((QUICKSTART / "configs" / "train.json").read_text())["train"]["handlers"]
    loader = {"_target_": "CheckpointLoader", "load_path": str(model), "load_dict": {"model": "@network"}}
    fine_tune = {
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "resume_dir": str(tmp_path / "checkpoints"),
        "dataset_dir": str(tmp_path / "absent"),
        "train#dataset#data": data["training"],
        "validate#dataset#data": data["validation"],
        "train#handlers": [{**loader, "strict": False}, *handlers],
        "train#trainer#max_epochs": 1,  # val_interval stays 5: the last epoch validates anyway
    }
    wf = ConfigWorkflow(
        config_file=str(QUICKSTART / "configs" / "train.json"),
        workflow_type="train",
        bundle_root=str(QUICKSTART),
        **fine_tune,
    )
    wf.initialize()
    seen = []
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.append((e.state.epoch, e.state.metrics["val_mean_dice"]))
    )
    wf.run()
    # the starting model (calibrated for its weights) is validated first: the fine-tune replaces it only if better
    assert [epoch for epoch, _ in seen] == [0, 1]
    new = read_calibration_record(model)
    best_epoch, best = max(seen, key=lambda x: x[1])
    assert new["epoch"] == best_epoch and new["metric"]["val_mean_dice"] == best
    assert check_calibration_record(model) == []
    assert (new["weights_fingerprint"] != old["weights_fingerprint"]) == (best_epoch == 1)


def test_folder_inference_reports_bad_files_and_exits_nonzero(tmp_path):
    """Good files in every format the readers support are segmented; a NaN image and a truncated file are named
    in the final error; an empty folder is an error."""
    import itk

    from monai_nacl.data import image_datalist, phantom_datalist

    tiny = _tiny(tmp_path)
    _workflow(QUICKSTART, ["train.json"], "train", **tiny).run()
    src = phantom_datalist(tmp_path / "data", 0, 0, 1)["test"][0]["image"]
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    img = nib.load(src)
    nib.save(img, folder / "a_plain.nii")
    shutil.copy(src, folder / "b_gz.nii.gz")
    itk.imwrite(itk.imread(src), str(folder / "c_nrrd.nrrd"))
    itk.imwrite(itk.imread(src), str(folder / "d_meta.mha"))
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), folder / "e_nan.nii.gz")
    (folder / "f_truncated.nii.gz").write_bytes(Path(src).read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image")
    assert [Path(d["image"]).name for d in image_datalist(folder)] == [
        "a_plain.nii",
        "b_gz.nii.gz",
        "c_nrrd.nrrd",
        "d_meta.mha",
        "e_nan.nii.gz",
        "f_truncated.nii.gz",
    ]
    infer = _workflow(
        QUICKSTART,
        ["inference.json"],
        "infer",
        input_dir=str(folder),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
    )
    infer.run()
    with pytest.raises(RuntimeError) as err:  # monai.bundle run exits non-zero with this message
        infer.finalize()
    message = str(err.value.__cause__)
    assert "2 of 6 input(s) failed (4 done)" in message
    assert "e_nan.nii.gz: ValueError: image: 1 of 64000 voxels are NaN" in message
    assert "f_truncated.nii.gz" in message
    for name in ("a_plain", "b_gz", "c_nrrd", "d_meta"):
        assert (tmp_path / "out" / f"{name}_seg.nii.gz").is_file(), name
    assert not list((tmp_path / "out").glob("e_nan*")) and not list((tmp_path / "out").glob("f_truncated*"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image .* in .*empty; it is empty"):
        image_datalist(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_datalist(tmp_path / "missing")


def test_prior_reaches_the_loss_in_training(tmp_path):
    tiny = _tiny(tmp_path)
    wf = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    loss = wf.parser.get_parsed_content("loss")
    used = []
    original = loss.forward

    def spy(input, target, prior=None):
        used.append(loss._next_prior is not None and loss._next_prior.shape == input.shape)
        return original(input, target, prior)

    loss.forward = spy
    wf.run()
    assert used and all(used)


def test_shipped_model_loads_plain():
    state = torch.load(QUICKSTART / "models" / "model.pt", weights_only=True)
    assert "temperature" in state and state["temperature"].numel() == 2  # elsewhere / near the structures
    parser = ConfigParser()
    parser.read_config(str(QUICKSTART / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no StaleTemperatureWarning: T was fitted for these weights
        network.load_state_dict(state)  # strict
    assert network.is_calibrated_for_current_weights()
    assert check_calibration_record(QUICKSTART / "models" / "model.pt") == []


def test_quickstart_command_runs_train_calibrate_evaluate(tmp_path):
    from monai_nacl.quickstart import main

    metrics = main(["--out", str(tmp_path), "--epochs", "1"])
    assert {"val_mean_dice", "val_ece", "val_cece", "val_hd95"} <= set(metrics)
    assert (tmp_path / "eval" / "reliability.png").is_file()
    fitted = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["temperature"]
    assert fitted.shape == (2,) and not torch.equal(fitted, torch.ones(2))


HIPPO_BUNDLE = ROOT / "bundles" / "hippocampus_mri_nacl_segmentation"
needs_hippocampus = pytest.mark.skipif(
    not (HIPPO_DATA / "dataset.json").is_file(),
    reason=f"MSD Task04 Hippocampus not found at {HIPPO_DATA} (set MONAI_NACL_HIPPOCAMPUS)",
)


@needs_hippocampus
def test_hippocampus_train_evaluate_calibrate_infer(tmp_path):
    from monai_nacl.data import load_datalist

    full = load_datalist(HIPPO_BUNDLE / "configs" / "datalist.json", HIPPO_DATA)
    assert [len(full[k]) for k in ("training", "validation", "test")] == [140, 20, 40]
    tiny = {
        "dataset_dir": str(HIPPO_DATA),
        "datalist": {"training": full["training"][:2], "validation": full["validation"][:1], "test": full["test"][:1]},
        "ckpt_dir": str(tmp_path / "models"),
        "resume_dir": str(tmp_path / "checkpoints"),
        "output_dir": str(tmp_path / "eval"),
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
    }
    for configs, prior in ((["train.json"], True), (["train.json", "train_dice_ce.json"], False)):
        wf = _workflow(HIPPO_BUNDLE, configs, "train", **tiny)
        handler = next(h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, PriorFromBatch))
        assert handler.enabled is prior
        wf.run()
        assert check_calibration_record(tmp_path / "models" / "model.pt") == []
    _workflow(HIPPO_BUNDLE, ["train.json", "calibrate.json"], "train", **tiny).run()
    fitted = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["temperature"]
    assert fitted.shape == (2,) and not torch.equal(fitted, torch.ones(2))  # near the structures / elsewhere
    evaluate = _workflow(HIPPO_BUNDLE, ["train.json", "evaluate.json"], "train", **tiny)
    evaluate.run()
    assert "val_ece" in evaluate.parser.get_parsed_content("validate#evaluator").state.metrics

    image = full["test"][0]["image"]
    infer = _workflow(
        HIPPO_BUNDLE,
        ["inference.json"],
        "infer",
        datalist=[{"image": image}],
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
    )
    infer.run()
    name = Path(image).name.replace(".nii.gz", "")
    src = nib.load(image)
    for suffix in ("seg", "prob", "entropy"):
        out = nib.load(tmp_path / "out" / f"{name}_{suffix}.nii.gz")
        assert out.shape[:3] == src.shape and (abs(out.affine - src.affine) < 1e-5).all()
    # MONAI Label adds string keys such as image_path; the preprocessing must pass them through
    pre = infer.parser.get_parsed_content("preprocessing")
    assert pre({"image": image, "image_path": image, "label_path": "x"})["image"].shape[1:] == src.shape


def test_shipped_hippocampus_models_load_plain():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(HIPPO_BUNDLE / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    assert network.foreground_margin == 1
    for name in ("model.pt", "model_dice_ce.pt"):
        state = torch.load(HIPPO_BUNDLE / "models" / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        # two temperatures [elsewhere, near the predicted foreground]: the structures are over-confident
        far, near = state["temperature"].tolist()
        assert near > 1.0 and near > far
        network.load_state_dict(state)  # strict


@pytest.mark.parametrize("bundle", [HIPPO_BUNDLE, QUICKSTART], ids=lambda b: b.name)
def test_shipped_records_name_the_inferer_the_bundle_serves_with(bundle):
    """Every shipped record says which inferer it was fitted through, so serving through another one is reported:
    the bundle's own inferer passes, mirror test-time augmentation (not what it was calibrated with) does not."""
    from monai_nacl.conformal.record import check_conformal_record
    from monai_nacl.inferers import MirrorInferer, describe_inferer
    from monai_nacl.temperature import check_calibration_record

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    inferer = parser.get_parsed_content("inferer")
    weights = sorted((bundle / "models").glob("*.pt"))
    assert weights
    for path in weights:
        record = json.loads(path.with_name(path.stem + ".calibration.json").read_text())
        assert record["inferer"] == describe_inferer(inferer), path
        assert check_calibration_record(path, inferer=inferer) == [], path
        problems = check_calibration_record(path, inferer=MirrorInferer(inferer))
        assert any("MirrorInferer" in p for p in problems), problems
        conformal = path.with_name(path.stem + ".conformal.json")
        if conformal.is_file():
            assert json.loads(conformal.read_text())["inferer"] == describe_inferer(inferer), conformal
            assert check_conformal_record(path, inferer=inferer) == [], conformal
    assert (bundle / "models" / "model.conformal.json").is_file()


@pytest.mark.parametrize("configs", [["train.json"], ["train.json", "train_dice_ce.json"]])
def test_rotated_in_corners_keep_a_prior_that_sums_to_one(configs):
    from monai.transforms import RandAffined

    parser = ConfigParser()
    parser.read_config([str(HIPPO_BUNDLE / "configs" / c) for c in configs])
    parser["bundle_root"] = str(HIPPO_BUNDLE)
    preprocessing = parser.get_parsed_content("train#preprocessing")
    affine = next(t for t in preprocessing.transforms if isinstance(t, RandAffined))
    modes = dict(zip(affine.keys, affine.padding_mode))
    assert modes["image"] == modes["label"] == "zeros"
    if "prior" not in affine.keys:
        assert configs[-1] == "train_dice_ce.json"
        return
    assert modes["prior"] == "border"
    # the same transform, always applied with a large rotation: tau still sums to 1 in rotated-in corners
    strong = RandAffined(
        affine.keys, prob=1.0, rotate_range=(0.6, 0.6, 0.6), mode=affine.mode, padding_mode=affine.padding_mode
    )
    strong.set_random_state(0)
    label = torch.zeros(1, 16, 16, 16)
    label[0, 5:11, 5:11, 5:11] = 1
    from monai_nacl.transforms import NeighborPrior

    prior = NeighborPrior(3)(label)
    out = strong({"image": torch.rand(1, 16, 16, 16), "label": label, "prior": prior})
    torch.testing.assert_close(out["prior"].sum(0), torch.ones(16, 16, 16), atol=1e-4, rtol=0)


def test_empty_validation_data_is_an_error_not_a_silent_run(tmp_path):
    from monai_nacl.data import phantom_datalist

    data = phantom_datalist(tmp_path / "data", 2, 1, 0)
    with pytest.raises(RuntimeError) as err:
        _workflow(QUICKSTART, ["train.json"], "train", **{**_tiny(tmp_path), "validate#dataset#data": []})
    assert "the validation datalist is empty" in str(err.value.__cause__)
    # a validation case without any foreground: Dice is NaN every time, so no model can be chosen: an error
    wf = _workflow(QUICKSTART, ["train.json"], "train", **_tiny(tmp_path))
    saver = wf.parser.get_parsed_content("validate#model_saver")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mean_dice=float("nan")))
    evaluator.remove_event_handler(saver._maybe_save, Events.EPOCH_COMPLETED)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, saver._maybe_save)
    with pytest.raises(RuntimeError) as err:
        wf.run()
    assert "no model was saved" in str(err.value.__cause__)
    assert data["validation"]


def test_inference_refuses_a_model_not_calibrated_for_its_weights(tmp_path):
    tiny = _tiny(tmp_path)
    _workflow(QUICKSTART, ["train.json"], "train", **tiny).run()
    model = tmp_path / "models" / "model.pt"
    state = torch.load(model, weights_only=True)
    state["network.model.0.conv.unit0.conv.weight"] = state["network.model.0.conv.unit0.conv.weight"] + 0.1
    torch.save(state, model)  # fine-tuned weights written without refitting: the record no longer matches
    override = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out")}
    with pytest.raises(RuntimeError) as err:
        _workflow(QUICKSTART, ["inference.json"], "infer", dataset_dir=str(tmp_path / "data"), **override)
    assert "not known to be calibrated" in str(err.value.__cause__) and "require_calibrated" in str(err.value.__cause__)
    with pytest.warns(UserWarning, match="temperature fitted for weights"):
        _workflow(
            QUICKSTART,
            ["inference.json"],
            "infer",
            dataset_dir=str(tmp_path / "data"),
            require_calibrated=False,
            **override,
        )


@needs_hippocampus
def test_dynunet_recipe_through_the_gpu_script_on_cpu(tmp_path):
    """The GPU command's plumbing on CPU: both models with the DynUNet recipe (1 epoch, 4 cases; the volumes cached
    and augmented on the training device, device_data.json, as on CUDA), each saved calibrated for its own weights;
    then inference with the recipe's network on one test case."""
    import subprocess
    import sys

    from monai_nacl.data import load_datalist

    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_hippocampus.py"), "--out", str(out), "--data", str(HIPPO_DATA)]
    cmd += ["--device", "cpu", "--epochs", "1", "--cases", "4", "--workers", "0", "--skip-tests", "--device-data"]
    cmd += ["--pack", str(tmp_path / "back")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "train_times.json").read_text())["device_data"] is True
    # what a device call can bring back: at most 8 files, the final weights and one archive of logs and records
    import tarfile

    back = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert len(back) <= 8 and all((tmp_path / "back" / n).stat().st_size <= 16 * 2**20 for n in back), back
    assert "device_data.json" in (out / "gpu_hippocampus.log").read_text()
    # the recipe's weights (17 MiB) come back in two parts
    assert [n for n in back if n.startswith("model_nacl")] == ["model_nacl.pt.part0", "model_nacl.pt.part1"], back
    assert "gpu_run.tar.gz" in back
    with tarfile.open(tmp_path / "back" / "gpu_run.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_hippocampus.log" in names and "final/nacl/models/model.calibration.json" in names
    # put back together here: the weights as trained, beside their calibration record
    unpacked = tmp_path / "unpacked"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu_hippocampus.py"),
            "--unpack",
            str(tmp_path / "back"),
            "--out",
            str(unpacked),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for model in ("nacl", "dice_ce"):
        joined = unpacked / "final" / model / "models" / "model.pt"
        assert joined.read_bytes() == (out / "final" / model / "models" / "model.pt").read_bytes()
        assert check_calibration_record(joined) == []
    assert not any(n.endswith(".pt") for n in names)
    assert "device_data.json" in (out / "gpu_hippocampus.log").read_text()
    for model in ("nacl", "dice_ce"):
        weights = out / "final" / model / "models" / "model.pt"
        assert check_calibration_record(weights) == [], model
        assert any(k.startswith("network.deep_supervision_heads") for k in torch.load(weights, weights_only=True))
    image = load_datalist(HIPPO_BUNDLE / "configs" / "datalist.json", HIPPO_DATA)["test"][0]["image"]
    infer = _workflow(
        HIPPO_BUNDLE,
        ["inference.json", "dynunet.json"],
        "infer",
        datalist=[{"image": image}],
        ckpt_dir=str(out / "final" / "nacl" / "models"),
        output_dir=str(tmp_path / "out"),
    )
    infer.run()
    infer.finalize()
    seg = nib.load(tmp_path / "out" / (Path(image).name.replace(".nii.gz", "") + "_seg.nii.gz"))
    assert seg.shape == nib.load(image).shape


@pytest.mark.parametrize("tta", [False, True])
def test_dynunet_mirror_tta_option(tta):
    from monai.inferers import SlidingWindowInferer

    from monai_nacl.inferers import MirrorInferer

    parser = ConfigParser()
    parser.read_config([str(HIPPO_BUNDLE / "configs" / c) for c in ("inference.json", "dynunet.json")])
    parser["bundle_root"] = str(HIPPO_BUNDLE)
    parser["mirror_tta"] = tta
    inferer = parser.get_parsed_content("inferer")
    if tta:
        assert isinstance(inferer, MirrorInferer) and isinstance(inferer.inferer, SlidingWindowInferer)
        assert inferer.spatial_axes == (0, 1, 2)
    else:
        assert isinstance(inferer, SlidingWindowInferer) and inferer.mode == "gaussian"
