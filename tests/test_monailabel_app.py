"""The ``monailabel_nacl`` MONAI Label app: bundle discovery and the torchvision stand-in (no MONAI Label needed),
and the real-server check (``tools/monailabel_server_check.py``) where a MONAI Label environment exists."""

from __future__ import annotations

import importlib.util
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
