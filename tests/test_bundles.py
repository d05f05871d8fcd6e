"""Bundle workflows through MONAI's ConfigWorkflow on tiny data, zoo-equivalent checks, multi-GPU (CPU, gloo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import bundle_workflow, torchrun_bundle
from ignite.engine import Events

from monai_nacl.bundle_check import all_bundles, check_bundle, default_schema_dir

ROOT = Path(__file__).resolve().parents[1]
# bundles that ship trained weights; the configs-only dataset bundles are checked in test_dataset_bundles.py
BUNDLES = [b for b in all_bundles() if (b / "models" / "model.pt").is_file()]
QUICKSTART = ROOT / "bundles" / "phantom_nacl_segmentation"


def _tiny(tmp_path: Path) -> dict:
    return {
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "dataset_dir": str(tmp_path / "data"),
        "num_train": 2,
        "num_val": 1,
        "num_test": 1,
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
        "train#handlers#4#log_dir": str(tmp_path / "tb"),
        "validate#handlers#1#log_dir": str(tmp_path / "tb"),
    }


_workflow = bundle_workflow


HIPPO_DATA = Path(os.environ.get("MONAI_NACL_HIPPOCAMPUS", ROOT.parent / "shared" / "data" / "hippocampus"))
DATA_DIRS = {"hippocampus_mri_nacl_segmentation": HIPPO_DATA}


@pytest.mark.skipif(not default_schema_dir().is_dir(), reason=f"metadata schemas not found at {default_schema_dir()}")
@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_zoo_checks_pass(bundle):
    data = DATA_DIRS.get(bundle.name)
    if data is not None and not data.is_dir():
        pytest.skip(f"{bundle.name} needs its data at {data} for the train workflow check")
    assert check_bundle(bundle, dataset_dir=data) == []


def test_train_evaluate_infer_workflows(tmp_path):
    tiny = _tiny(tmp_path)
    train = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    train.run()
    train.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()
    assert (tmp_path / "models" / "train_checkpoint_1.pt").is_file()

    tiny.pop("train#handlers#4#log_dir")
    tiny.pop("validate#handlers#1#log_dir")
    evaluate = _workflow(QUICKSTART, ["train.json", "evaluate.json"], "train", **tiny)
    evaluate.run()
    metrics = evaluate.parser.get_parsed_content("validate#evaluator").state.metrics
    for key in ("val_mean_dice", "val_hd95", "val_ece", "val_cece", "val_nll", "val_brier"):
        assert key in metrics
    assert (tmp_path / "eval" / "reliability.png").is_file()
    assert (tmp_path / "eval" / "val_ece_raw.csv").is_file()

    calibrate = _workflow(QUICKSTART, ["train.json", "calibrate.json"], "train", **tiny)
    calibrate.run()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert state["temperature"].item() != 1.0

    infer = _workflow(
        QUICKSTART,
        ["inference.json"],
        "infer",
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
        dataset_dir=str(tmp_path / "data"),
    )
    infer.run()
    case = "phantom_2000_40x40x40"
    seg = nib.load(tmp_path / "out" / f"{case}_seg.nii.gz")
    prob = nib.load(tmp_path / "out" / f"{case}_prob.nii.gz")
    ent = nib.load(tmp_path / "out" / f"{case}_entropy.nii.gz")
    src = nib.load(tmp_path / "data" / "imagesTr" / f"{case}.nii.gz")
    assert seg.shape == src.shape and ent.shape == src.shape and prob.shape == (*src.shape, 4)
    assert (abs(seg.affine - src.affine) < 1e-5).all()


def test_training_killed_mid_epoch_resumes(tmp_path):
    tiny = {**_tiny(tmp_path), "train#trainer#max_epochs": 2, "val_interval": 5}
    first = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    trainer = first.parser.get_parsed_content("train#trainer")

    def kill(engine):
        if engine.state.epoch == 2:
            raise KeyboardInterrupt("simulated kill in epoch 2")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, kill)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    saved = sorted(p.name for p in (tmp_path / "models").glob("train_checkpoint_*.pt"))
    assert saved == ["train_checkpoint_1.pt"]
    assert not list((tmp_path / "models").glob("*.tmp"))

    second = _workflow(QUICKSTART, ["train.json"], "train", **tiny)
    trainer2 = second.parser.get_parsed_content("train#trainer")
    assert trainer2.state.epoch == 1  # epoch 1 kept
    second.run()
    assert trainer2.state.epoch == 2
    assert (tmp_path / "models" / "train_checkpoint_2.pt").is_file()


def test_multi_gpu_config_with_torchrun_on_cpu(tmp_path):
    tiny = {**_tiny(tmp_path), "num_val": 2}  # the validation sampler needs a case per rank
    result = torchrun_bundle(QUICKSTART, ["train.json", "multi_gpu_train.json"], tiny)
    assert (tmp_path / "models" / "train_checkpoint_1.pt").is_file()
    assert "val_ece" in result.stdout + result.stderr


def test_inference_preprocessing_survives_monai_label_keys(tmp_path):
    from monai_nacl.data import phantom_datalist

    item = phantom_datalist(tmp_path, 0, 0, 1)["test"][0]
    wf = _workflow(QUICKSTART, ["inference.json"], "infer", dataset_dir=str(tmp_path))
    pre = wf.parser.get_parsed_content("preprocessing")
    # MONAI Label adds string entries such as image_path next to the image
    out = pre({"image": item["image"], "image_path": item["image"], "label_path": "none", "model": "x"})
    assert out["image"].shape == (1, 40, 40, 40)
    assert out["image_path"] == item["image"]


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


def test_shipped_model_loads_plain(tmp_path):
    state = torch.load(QUICKSTART / "models" / "model.pt", weights_only=True)
    assert "temperature" in state and state["temperature"].numel() == 1
    shutil.copy(QUICKSTART / "models" / "model.pt", tmp_path / "model.pt")


def test_quickstart_command_runs_train_calibrate_evaluate(tmp_path):
    from monai_nacl.quickstart import main

    metrics = main(["--out", str(tmp_path), "--epochs", "1"])
    assert {"val_mean_dice", "val_ece", "val_cece", "val_hd95"} <= set(metrics)
    assert (tmp_path / "eval" / "reliability.png").is_file()
    assert torch.load(tmp_path / "models" / "model.pt", weights_only=True)["temperature"].item() != 1.0


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
        "output_dir": str(tmp_path / "eval"),
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
    }
    for configs in (["train.json"], ["train.json", "train_dice_ce.json"]):
        wf = _workflow(HIPPO_BUNDLE, configs, "train", **tiny)
        wf.run()
        assert (tmp_path / "models" / "model.pt").is_file()
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


@needs_hippocampus
def test_hippocampus_multi_gpu_config_with_torchrun_on_cpu(tmp_path):
    import json

    full = json.loads((HIPPO_BUNDLE / "configs" / "datalist.json").read_text())
    small = {"training": full["training"][:2], "validation": full["validation"][:2], "test": full["test"][:1]}
    (tmp_path / "datalist.json").write_text(json.dumps(small))
    overrides = {
        "dataset_dir": HIPPO_DATA,
        "datalist#datalist_file": tmp_path / "datalist.json",
        "ckpt_dir": tmp_path / "models",
        "output_dir": tmp_path / "eval",
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
    }
    result = torchrun_bundle(HIPPO_BUNDLE, ["train.json", "multi_gpu_train.json"], overrides)
    assert (tmp_path / "models" / "train_checkpoint_1.pt").is_file()
    assert "val_ece" in result.stdout + result.stderr


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
