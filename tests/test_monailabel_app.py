"""The ``monailabel_nacl`` MONAI Label app: bundle discovery and the torchvision stand-in (no MONAI Label needed),
and the real-server check (``tools/monailabel_server_check.py``) where a MONAI Label environment exists."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HIPPOCAMPUS

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "monailabel_nacl"
BUNDLES = ROOT / "bundles"
HIPPO = "hippocampus_mri_nacl_segmentation"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nb():
    return _load(APP / "nacl_bundles.py", "monailabel_nacl_bundles_under_test")


def test_every_repository_bundle_is_found(nb):
    found = nb.find_bundles(str(BUNDLES), APP / "model")
    assert set(found) == {p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file()}
    assert HIPPO in found and found[HIPPO] == (BUNDLES / HIPPO).resolve()
    assert list(found) == sorted(found)
    assert nb.has_weights(found[HIPPO]) and nb.has_config(found[HIPPO], nb.INFER_CONFIGS)
    assert nb.has_config(found[HIPPO], nb.TRAIN_CONFIGS)


def test_bundles_option_forms(nb, tmp_path):
    shutil.copytree(BUNDLES / HIPPO / "configs", tmp_path / "a" / HIPPO / "configs")
    (tmp_path / "a" / "notes").mkdir()  # not a bundle: ignored
    (tmp_path / "a" / "readme.txt").write_text("x")
    shutil.copytree(BUNDLES / HIPPO / "configs", tmp_path / "b" / "other" / "configs")

    # default folder when the option is absent or empty
    assert set(nb.find_bundles(None, tmp_path / "a")) == {HIPPO}
    assert set(nb.find_bundles("  ", tmp_path / "a")) == {HIPPO}
    # a bundle itself, a folder of bundles, several separated by ',' or os.pathsep
    assert set(nb.find_bundles(str(tmp_path / "b" / "other"), tmp_path)) == {"other"}
    both = {HIPPO, "other"}
    assert set(nb.find_bundles(f"{tmp_path / 'a'},{tmp_path / 'b'}", tmp_path)) == both
    assert set(nb.find_bundles(f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b' / 'other'}", tmp_path)) == both
    # no weights: discovered, but not servable for inference
    assert not nb.has_weights(tmp_path / "a" / HIPPO)


def test_bundles_option_errors(nb, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        nb.find_bundles(str(tmp_path / "missing"), tmp_path)
    for sub in ("x", "y"):
        shutil.copytree(BUNDLES / HIPPO / "configs", tmp_path / sub / HIPPO / "configs")
    with pytest.raises(ValueError, match="two bundles named"):
        nb.find_bundles(f"{tmp_path / 'x'},{tmp_path / 'y'}", tmp_path)
    # the same folder twice is one bundle
    assert set(nb.find_bundles(f"{tmp_path / 'x'},{tmp_path / 'x' / HIPPO}", tmp_path)) == {HIPPO}


def test_torchvision_standin():
    init = _load(APP / "compat" / "torchvision" / "__init__.py", "torchvision_standin_under_test")
    utils = _load(APP / "compat" / "torchvision" / "utils.py", "torchvision_standin_utils_under_test")
    assert init.__version__ == "0.0.0" and init.STANDIN
    for fn in (utils.make_grid, utils.save_image):
        with pytest.raises(RuntimeError, match="stand-in"):
            fn(None)


def _monailabel_venv() -> Path | None:
    venv = Path(os.environ.get("MONAI_LABEL_VENV", "/work/mlvenv"))
    return venv if (venv / "bin" / "python").is_file() else None


@pytest.mark.slow
@pytest.mark.monailabel
def test_real_server_check():
    """Starts the app on 127.0.0.1, infers, trains 2 epochs and stops it (a few minutes on 2 CPU cores)."""
    venv = _monailabel_venv()
    if venv is None:
        pytest.skip(
            "no MONAI Label environment: set MONAI_LABEL_VENV to one built as in docs/monai_label.md "
            "(default /work/mlvenv)"
        )
    if not (HIPPOCAMPUS / "imagesTr").is_dir():
        pytest.skip(f"MSD Task04 Hippocampus data not found at {HIPPOCAMPUS} (set MONAI_NACL_HIPPOCAMPUS)")
    cmd = [str(venv / "bin" / "python"), str(ROOT / "tools" / "monailabel_server_check.py"), "--venv", str(venv)]
    cmd += ["--data", str(HIPPOCAMPUS)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "FAIL" not in out and out.count("PASS (") >= 8, out[-6000:]
    print(out, file=sys.stderr)


# Run in the MONAI Label environment: the app's infer task and MONAI Label's own BundleInferTask on one bundle copy
# whose two weight files have the same mtime; prints, as JSON, which file's weights each request was served with.
_SERVED_SCRIPT = r"""
import json, os, shutil, sys
from pathlib import Path

import torch

app, bundle = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(app))
import main  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402

models = bundle / "models"
tasks = {
    "app": main.NACLBundleInferTask(str(bundle), {}, load_strict=True),
    "monailabel": BundleInferTask(str(bundle), {}, load_strict=True),
}
states = {}


def load(name):
    return torch.load(models / name, map_location="cpu", weights_only=True)


def served(task, name):
    net = task._get_network("cpu", {"model_filename": name}).state_dict()
    same = [f for f, sd in states.items() if set(sd) == set(net) and all(torch.equal(sd[k], net[k]) for k in sd)]
    return same[0] if len(same) == 1 else f"{len(same)} files"


# (a) two files, different weights, one mtime (as extracted from a zip: whole even seconds)
t = (models / "model.pt").stat().st_mtime_ns // 2_000_000_000 * 2_000_000_000
for f in ("model.pt", "model_dice_ce.pt"):
    os.utime(models / f, ns=(t, t))
    states[f] = load(f)
out = {k: [served(task, f) for f in ("model.pt", "model_dice_ce.pt", "model.pt")] for k, task in tasks.items()}

# (b) model.pt rewritten in place (same inode) with other temperatures (same size), its mtime set back
new = load("model.pt")
new["temperature"] = new["temperature"] * 1.25
(bundle.parent / "rewrite").mkdir()
torch.save(new, bundle.parent / "rewrite" / "model.pt")  # same name: same zip record names, so same size
size, ino = (models / "model.pt").stat().st_size, (models / "model.pt").stat().st_ino
with open(models / "model.pt", "r+b") as fh:
    fh.write((bundle.parent / "rewrite" / "model.pt").read_bytes())
    fh.truncate()
os.utime(models / "model.pt", ns=(t, t))
st = (models / "model.pt").stat()
# its calibration record says so (a consistent recalibration): the app checks records when it loads a file
record_file = models / "model.calibration.json"
record = json.loads(record_file.read_text())
record["temperature"] = [float(v) for v in new["temperature"].flatten()]
record_file.write_text(json.dumps(record))
states["model.pt (rewritten)"] = new
for k, task in tasks.items():
    out[k].append(served(task, "model.pt"))
out["same_size_inode_mtime"] = [st.st_size == size, st.st_ino == ino, st.st_mtime_ns == t]

# (d) requests alternating between two files: the app keeps both networks (networks_per_device, default 2) and
# loads neither again; with room for one it loads each time, still serving the file each request names
app = tasks["app"]


def get(task, name):
    return task._get_network("cpu", {"model_filename": name})


nets = [get(app, f) for f in ("model.pt", "model_dice_ce.pt") * 2]
out["reused"] = [nets[0] is nets[2], nets[1] is nets[3], nets[0] is not nets[1]]
# a third file: the least recently used network (model_dice_ce.pt's, after model.pt was asked for again) goes
for suffix in (".pt", ".calibration.json"):
    shutil.copyfile(models / f"model{suffix}", models / f"model_copy{suffix}")
first = get(app, "model.pt")
copy = get(app, "model_copy.pt")
out["lru"] = [get(app, "model.pt") is first, get(app, "model_copy.pt") is copy, get(app, "model_dice_ce.pt") is not nets[1]]
# the calibration record alone changed: the cached network is not served, the file is checked again and refused;
# the refusal drops nothing
dice = get(app, "model_dice_ce.pt")
record = json.loads((models / "model_copy.calibration.json").read_text())
record["temperature"] = [2 * v for v in record["temperature"]]
(models / "model_copy.calibration.json").write_text(json.dumps(record))
try:
    get(app, "model_copy.pt")
    out["record_only"] = "served"
except ValueError as e:
    out["record_only"] = str(e)
out["kept_after_refusal"] = get(app, "model_dice_ce.pt") is dice
app.clear_cache()  # MONAI Label's own call to free the networks: the app's networks go too
out["cleared"] = get(app, "model_dice_ce.pt") is not dice
one = main.NACLBundleInferTask(str(bundle), {"networks_per_device": "1"}, load_strict=True)
nets = [get(one, f) for f in ("model.pt", "model_dice_ce.pt") * 2]
out["one_per_device"] = [nets[0] is nets[2], [served(one, f) for f in ("model_dice_ce.pt", "model.pt")]]
out["bad_option"] = {}
for bad in ("0", "two", "\u00b2"):
    try:
        main.NACLBundleInferTask(str(bundle), {"networks_per_device": bad}, load_strict=True)
        out["bad_option"][bad] = "accepted"
    except ValueError as e:
        out["bad_option"][bad] = str(e)

# (c) model_dice_ce.pt's temperature changed without its record: MONAI Label alone serves it, the app refuses it
stale = load("model_dice_ce.pt")
stale["temperature"] = stale["temperature"] * 0.5
torch.save(stale, models / "model_dice_ce.pt")
out["stale"] = {}
for k, task in tasks.items():
    try:
        task._get_network("cpu", {"model_filename": "model_dice_ce.pt"})
        out["stale"][k] = "served"
    except ValueError as e:
        out["stale"][k] = str(e)
print("SERVED " + json.dumps(out))
"""


@pytest.mark.monailabel
def test_infer_task_serves_the_requested_weights_file(tmp_path):
    """Files of one mtime (zip extraction, ``cp -p``) and a file rewritten with its mtime kept: the app's infer task
    serves each request the weights of the file it names; MONAI Label's own task (cache keyed by mtime only) does
    not, which shows the scenario is the one that needs the fix. A file whose temperature its calibration record
    does not vouch for is refused by the app (MONAI Label runs no bundle ``initialize``), served by MONAI Label."""
    venv = _monailabel_venv()
    if venv is None:
        pytest.skip(
            "no MONAI Label environment: set MONAI_LABEL_VENV to one built as in docs/monai_label.md "
            "(default /work/mlvenv)"
        )
    bundle = tmp_path / HIPPO
    shutil.copytree(BUNDLES / HIPPO / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    for name in ("model.pt", "model_dice_ce.pt"):  # with their calibration records, which the app checks
        for f in (BUNDLES / HIPPO / "models").glob(f"{Path(name).stem}.*"):
            shutil.copyfile(f, bundle / "models" / f.name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [str(venv / "bin" / "python"), "-c", _SERVED_SCRIPT, str(APP), str(bundle)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    served = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("SERVED "))[7:])
    assert served["same_size_inode_mtime"] == [True, True, True], served
    assert served["app"] == ["model.pt", "model_dice_ce.pt", "model.pt", "model.pt (rewritten)"], served
    # MONAI Label alone: model.pt's network for model_dice_ce.pt, and the old weights after the rewrite
    assert served["monailabel"] == ["model.pt", "model.pt", "model.pt", "model.pt"], served
    assert served["reused"] == [True, True, True] and served["lru"] == [True, True, True], served
    assert "model_copy.calibration.json: temperature" in served["record_only"], served
    assert served["kept_after_refusal"] and served["cleared"], served
    assert served["one_per_device"] == [False, ["model_dice_ce.pt", "model.pt (rewritten)"]], served
    for bad, message in served["bad_option"].items():
        assert f"networks_per_device must be a positive integer, got {bad!r}" in message, served
    # a temperature its record does not vouch for: refused by the app (require_calibrated), naming the record
    assert served["stale"]["monailabel"] == "served", served
    refusal = served["stale"]["app"]
    assert "not known to be calibrated" in refusal and "model_dice_ce.calibration.json: temperature" in refusal
