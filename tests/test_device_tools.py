"""The GPU run's tools that need no GPU and no training: the time plan, packing and unpacking what a device call
brings back, and preparing the call (``tools/gpu_hippocampus.py``, ``tools/prepare_device_run.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIPPO_BUNDLE = ROOT / "bundles" / "hippocampus_mri_nacl_segmentation"


def _gpu_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_hippocampus_under_test", ROOT / "tools" / "gpu_hippocampus.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


def test_gpu_script_unpack_refuses_what_does_not_add_up(tmp_path, monkeypatch, capsys):
    """A device call can leave out a file past its limits: a lost last part must not be joined into a shorter
    model.pt with exit 0. The manifest (size and sha256 of each model, beside the parts and in the archive) tells."""
    gpu = _gpu_script()
    monkeypatch.setattr(gpu, "PART_BYTES", 1000)
    run = tmp_path / "run"
    weights = run / "final" / "nacl" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(bytes(range(256)) * 10)  # 2560 bytes: 3 parts
    (weights.parent / "model.calibration.json").write_text("{}")
    back = tmp_path / "back"
    names = sorted(p.name for p in gpu.pack(run, back))
    assert names == ["gpu_run.tar.gz"] + [f"model_nacl.pt.part{i}" for i in range(3)] + [gpu.MANIFEST]
    # whole: joined as trained; the model the run did not finish is reported
    assert gpu.unpack(back, tmp_path / "ok") == [tmp_path / "ok" / "final" / "nacl" / "models" / "model.pt"]
    assert (tmp_path / "ok" / "final" / "nacl" / "models" / "model.pt").read_bytes() == weights.read_bytes()
    assert "no weights of model dice_ce" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds files"):
        gpu.unpack(back, tmp_path / "ok")
    # the last part lost: refused, and nothing written
    part2 = (back / "model_nacl.pt.part2").read_bytes()
    (back / "model_nacl.pt.part2").unlink()
    with pytest.raises(SystemExit, match=r"incomplete, missing \['model_nacl.pt.part2'\]"):
        gpu.unpack(back, tmp_path / "lost")
    assert not (tmp_path / "lost").exists()
    # a part of the right size and the wrong content: only the sha256 tells
    (back / "model_nacl.pt.part2").write_bytes(bytes(len(part2)))
    with pytest.raises(SystemExit, match="do not match the manifest"):
        gpu.unpack(back, tmp_path / "bad")
    (back / "model_nacl.pt.part2").write_bytes(part2)
    # a manifest naming a model this script does not train, or files outside the folder
    manifest = json.loads((back / gpu.MANIFEST).read_text())
    for bad in ({"../x": manifest["nacl"]}, {"nacl": ["model_nacl.pt.part0"]}, [1]):
        (back / gpu.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match="not a manifest of models"):
            gpu.unpack(back, tmp_path / "bad")
    # records in the archive of a model whose weights the manifest does not list
    (back / gpu.MANIFEST).write_text(json.dumps({}))
    with pytest.raises(SystemExit, match=r"records of models \['nacl'\] whose weights are not in"):
        gpu.unpack(back, tmp_path / "bad")
    (back / gpu.MANIFEST).write_text(json.dumps(manifest))
    # an archive that is not one
    (back / "gpu_run.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(SystemExit, match="cannot be read"):
        gpu.unpack(back, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_gpu_script_plans_its_time(tmp_path):
    """Start-up (caching, network build) is paid once, validation every val_interval epochs and at the end: the
    plan reads both from the probe's log instead of dividing its wall time by its epochs."""
    gpu = _gpu_script()
    prefix = "2026-11-29 00:35:50,473 - ignite.engine.engine"
    log = tmp_path / "train.log"
    log.write_text(
        f"{prefix}.SupervisedTrainer - INFO - Epoch[1] Complete. Time taken: 00:00:04.000\n"
        f"{prefix}.SupervisedEvaluator - INFO - Epoch[2] Complete. Time taken: 00:00:10.000\n"
        f"{prefix}.SupervisedEvaluator - INFO - Engine run finished. Time taken: 00:00:10.000\n"
        f"{prefix}.SupervisedTrainer - INFO - Epoch[2] Complete. Time taken: 00:00:15.000\n"
    )
    interval = json.loads((HIPPO_BUNDLE / "configs" / "train_dynunet.json").read_text())["val_interval"]
    startup, validation, per_epoch = 79.0 - 19.0, 10.0, 4.0 + 10.0 / interval
    assert gpu.planned_epochs(log, 79.0, 480) == int((480 - startup - validation) / per_epoch)
    # no epoch times in the log: wall time per probed epoch, clipped to at least 10 epochs
    assert gpu.planned_epochs(tmp_path / "missing.log", 79.0, 480) == 10
    assert gpu.planned_epochs(log, 79.0, 1e9) == 1000
    # the CUDA checks share one budget: once it is spent, the remaining steps are skipped and reported, not run
    out = tmp_path / "out"
    out.mkdir()
    assert gpu.cuda_checks(out, budget=0) == ["cuda_tests", "bench_loss", "bench_metrics", "prior_cache_memory"]
    assert "prior_cache_memory: skipped" in (out / "gpu_hippocampus.log").read_text()


def test_device_run_preparation(tmp_path):
    """The device call's command fits the tool's limit, and the data copy holds the dataset (no download here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_device_run", ROOT / "tools" / "prepare_device_run.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    assert len(prep.COMMAND) <= 2000 and prep.TIMEOUT_S <= 600
    assert "--pack $OUT" in prep.COMMAND and ".device/whl/*.whl" in prep.COMMAND
    src = tmp_path / "src"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    (src / "dataset.json").write_text("{}")
    (src / "imagesTr" / "hippocampus_001.nii.gz").write_bytes(b"x")
    with pytest.raises(SystemExit, match="no labelsTr/\\*.nii.gz there"):
        prep.copy_data(src, tmp_path / "dest")
    (src / "labelsTr" / "hippocampus_001.nii.gz").write_bytes(b"y")
    prep.copy_data(src, tmp_path / "dest")
    assert sorted(str(p.relative_to(tmp_path / "dest")) for p in (tmp_path / "dest").rglob("*") if p.is_file()) == [
        "dataset.json",
        "imagesTr/hippocampus_001.nii.gz",
        "labelsTr/hippocampus_001.nii.gz",
    ]
    with pytest.raises(SystemExit, match="no MSD Task04 dataset.json"):
        prep.copy_data(tmp_path / "nowhere", tmp_path / "dest")

    # a copy that fails half-way keeps the previous one
    def broken(folder):
        (folder / "partial").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        prep._replace(tmp_path / "dest", broken)
    assert (tmp_path / "dest" / "labelsTr" / "hippocampus_001.nii.gz").is_file()
    assert not (tmp_path / "dest" / "partial").exists() and not (tmp_path / "dest.new").exists()
    # a run stopped between its two renames (dest already moved aside): the next one puts it back first
    (tmp_path / "dest").rename(tmp_path / "dest.old")
    prep._replace(tmp_path / "dest", lambda folder: (folder / "fresh").write_text("y"))
    assert (tmp_path / "dest" / "fresh").is_file() and not (tmp_path / "dest.old").exists()
