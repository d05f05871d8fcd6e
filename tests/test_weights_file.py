"""``--weights_file`` selects the model file for evaluate.json and calibrate.json, as it does for inference.json."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bundle_workflow, tiny_bundle_overrides

from monai_nacl.conformal import check_conformal_record, read_conformal_record
from monai_nacl.temperature import check_calibration_record

# bundle workflows on the shipped phantom model (no training); `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = ROOT / "bundles" / "phantom_nacl_segmentation"
SHIPPED = PHANTOM / "models"


_tiny = tiny_bundle_overrides


def _models(tmp_path: Path) -> Path:
    """``tmp_path/models`` holding a copy of the shipped model and its records."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("model.pt", "model.calibration.json", "model.conformal.json"):
        shutil.copy2(SHIPPED / name, models / name)
    return models


def _with_temperature(src: Path, dst: Path, temperature: float) -> torch.Tensor:
    """Write ``src``'s state_dict to ``dst`` with every temperature set to ``temperature`` (the weights unchanged)."""
    state = torch.load(src, weights_only=True)
    state["temperature"] = torch.full_like(state["temperature"], temperature)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)
    return state["temperature"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_evaluate_loads_the_weights_file_it_is_given(tmp_path):
    models = _models(tmp_path)
    other = tmp_path / "other" / "model_hot.pt"
    hot = _with_temperature(models / "model.pt", other, 4.0)
    shipped = torch.load(models / "model.pt", weights_only=True)["temperature"]
    assert not torch.allclose(shipped, hot)

    results = {}
    for name, override in (("default", {}), ("other", {"weights_file": str(other)})):
        wf = bundle_workflow(
            PHANTOM,
            ["train.json", "evaluate.json"],
            "train",
            **{**_tiny(tmp_path), "output_dir": str(tmp_path / f"eval_{name}"), **override},
        )
        wf.run()
        network = wf.parser.get_parsed_content("network")
        metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
        results[name] = (network.state_dict()["temperature"].detach().cpu(), metrics)

    torch.testing.assert_close(results["default"][0], shipped)  # without the option: <ckpt_dir>/model.pt
    torch.testing.assert_close(results["other"][0], hot)  # with it: the named file
    # the same weights, so the same segmentation; the other temperature shows in the probabilities' NLL
    assert results["other"][1]["val_mean_dice"] == pytest.approx(results["default"][1]["val_mean_dice"])
    assert results["other"][1]["val_nll"] != pytest.approx(results["default"][1]["val_nll"], rel=1e-3)


def test_calibrate_rewrites_the_weights_file_and_records_it_beside_that_file(tmp_path):
    models = _models(tmp_path)
    before = _digests(models)
    # a relative path, as in the documented command: resolved from the working folder
    other = tmp_path / "other" / "model_dice_ce.pt"
    _with_temperature(models / "model.pt", other, 4.0)

    cfg = PHANTOM / "configs"
    files = "[" + ",".join(f"'{cfg / c}'" for c in ("train.json", "calibrate.json")) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    cmd += ["--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(PHANTOM)]
    overrides = {**_tiny(tmp_path), "output_dir": tmp_path / "eval", "weights_file": "other/model_dice_ce.pt"}
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the named file was refitted in place, with its temperature and conformal records beside it
    refitted = torch.load(other, weights_only=True)["temperature"]
    assert not torch.allclose(refitted, torch.full_like(refitted, 4.0))
    assert sorted(p.name for p in other.parent.iterdir()) == [
        "model_dice_ce.calibration.json",
        "model_dice_ce.conformal.json",
        "model_dice_ce.pt",
    ]
    assert check_calibration_record(other) == []
    assert check_conformal_record(other) == []
    assert read_conformal_record(other)["fitted_by"] == "ConformalFitHandler"
    # <ckpt_dir>/model.pt and its records are untouched
    assert _digests(models) == before


def _messages(error: BaseException) -> str:
    """The error and every error it was raised from (MONAI wraps a failing config expression in a RuntimeError)."""
    parts = []
    while error is not None:
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("config", ["evaluate.json", "calibrate.json"])
def test_unreadable_weights_file_is_named_before_any_data_is_loaded(tmp_path, config):
    models = _models(tmp_path)
    before = _digests(models)
    cases = {"empty.pt": b"", "notes.pt": b"not a checkpoint\n", "missing.pt": None}
    for bad, content in cases.items():
        if content is not None:
            (tmp_path / bad).write_bytes(content)
        with pytest.raises(Exception) as info:
            bundle_workflow(
                PHANTOM, ["train.json", config], "train", weights_file=str(tmp_path / bad), **_tiny(tmp_path)
            )
        expected = f"{bad}: cannot be read as weights" if content is not None else f"weights file .*{bad} not found"
        assert re.search(expected, _messages(info.value)), _messages(info.value)
        assert content is None or (tmp_path / bad).read_bytes() == content
    assert _digests(models) == before


def test_calibrate_checks_the_conformal_settings_before_rewriting_the_weights(tmp_path):
    models = _models(tmp_path)
    before = _digests(models)
    with pytest.raises(Exception) as info:
        wf = bundle_workflow(
            PHANTOM, ["train.json", "calibrate.json"], "train", conformal_alphas=[1.5], **_tiny(tmp_path)
        )
        wf.run()  # reached only if initialize accepted the alphas: then the weights would be rewritten first
    assert "alpha" in _messages(info.value)
    assert _digests(models) == before
