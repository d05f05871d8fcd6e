from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_nacl.data import check_datalist, make_phantom, phantom_datalist
from monai_nacl.transforms import VoxelEntropy


def test_phantoms_are_seeded_and_have_touching_structures():
    a_img, a_lab = make_phantom(3)
    b_img, b_lab = make_phantom(3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert set(np.unique(a_lab)) == {0, 1, 2, 3}
    lab = torch.as_tensor(a_lab[0])
    # core (1) and shell (2) share a boundary: some core voxel has a shell neighbour along an axis
    core_shell = ((lab[1:] == 1) & (lab[:-1] == 2)) | ((lab[1:] == 2) & (lab[:-1] == 1))
    assert core_shell.any()
    assert not np.array_equal(make_phantom(4)[1], a_lab)


def test_phantom_blur_is_the_former_replicate_padded_gaussian():
    """MONAI's separable_filtering gives exactly what the former per-axis pad + conv3d loop gave."""
    import torch.nn.functional as F

    from monai_nacl.data.phantoms import _blur

    def former(x, sigma):
        r = int(np.ceil(2 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = k / k.sum()
        y = x[None]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.numel()
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
            y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
        return y[0]

    x = torch.rand(1, 17, 12, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for sigma in (0.8, 1.3):
        torch.testing.assert_close(_blur(x, sigma), former(x, sigma), rtol=0, atol=1e-12)


def test_phantom_datalist_writes_once_and_checks(tmp_path):
    d = phantom_datalist(tmp_path, 2, 1, 1)
    assert [len(d[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
    mtime = (tmp_path / "imagesTr").stat().st_mtime_ns
    assert phantom_datalist(tmp_path, 2, 1, 1) == d
    assert (tmp_path / "imagesTr").stat().st_mtime_ns == mtime
    assert check_datalist(d["training"], num_classes=4) == 2


def _write(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), path)
    return str(path)


def test_check_datalist_names_the_bad_case(tmp_path):
    img = _write(tmp_path / "img.nii.gz", np.zeros((4, 4, 4), np.float32))
    good = _write(tmp_path / "lab.nii.gz", np.ones((4, 4, 4), np.uint8))
    small = _write(tmp_path / "small.nii.gz", np.ones((4, 4, 3), np.uint8))
    shifted = _write(tmp_path / "shift.nii.gz", np.ones((4, 4, 4), np.uint8), np.diag([2.0, 1, 1, 1]))
    bad_values = _write(tmp_path / "bad.nii.gz", np.full((4, 4, 4), 7, np.uint8))
    assert check_datalist([{"image": img, "label": good}], 3) == 1
    with pytest.raises(ValueError, match="not found"):
        check_datalist([{"image": str(tmp_path / "missing.nii.gz"), "label": good}], 3)
    with pytest.raises(ValueError, match=r"case 1 .*small.nii.gz.*shape"):
        check_datalist([{"image": img, "label": good}, {"image": img, "label": small}], 3)
    with pytest.raises(ValueError, match="affines differ"):
        check_datalist([{"image": img, "label": shifted}], 3)
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        check_datalist([{"image": img, "label": bad_values}], 3)
    with pytest.raises(ValueError, match="empty"):
        check_datalist([], 3)


def test_voxel_entropy():
    p = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).view(2, 2, 1, 1)
    h = VoxelEntropy()(p)
    assert h.shape == (1, 2, 1, 1)
    assert h[0, 0].item() == pytest.approx(1.0) and h[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="C >= 2"):
        VoxelEntropy()(torch.ones(1, 3, 3))


def test_load_datalist_resolves_relative_paths_and_names_missing(tmp_path):
    from monai_nacl.data import load_datalist

    (tmp_path / "split.json").write_text(
        '{"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}'
    )
    d = load_datalist(tmp_path / "split.json", tmp_path)
    assert d["training"][0]["image"] == str((tmp_path / "imagesTr" / "a.nii.gz").resolve())
    with pytest.raises(ValueError, match="dataset_dir not found"):
        load_datalist(tmp_path / "split.json", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="datalist file not found"):
        load_datalist(tmp_path / "none.json", tmp_path)


def test_load_datalist_matches_the_former_resolution_of_every_split(tmp_path, monkeypatch):
    import json

    from monai_nacl.data import load_datalist

    root = tmp_path / "Task04"
    (root / "imagesTr").mkdir(parents=True)
    (root / "imagesTr" / "b_0001.nii.gz").write_bytes(b"")
    splits = {
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}, {"image": "imagesTr/b.nii.gz"}],
        "validation": [{"image": "../elsewhere/c.nii.gz", "label": str(tmp_path / "abs.nii.gz")}],
        "test": [],
    }
    (tmp_path / "split.json").write_text(json.dumps(splits))
    monkeypatch.chdir(tmp_path)
    loaded = load_datalist("split.json", "Task04")  # relative dataset_dir: absolute paths come back
    # the result the former hand-written loader gave: (root / value).resolve() for every path
    assert loaded == {
        split: [{k: str((root / v).resolve()) for k, v in item.items()} for item in items]
        for split, items in splits.items()
    }
    # through load_decathlon_datalist: channel lists resolve too, other entries only when they exist, bare test
    # paths become {"image": ...}, metadata keys are left out
    extra = {
        "name": "Hippocampus",
        "training": [{"image": ["./imagesTr/b_0000.nii.gz", "./imagesTr/b_0001.nii.gz"], "case": "b", "fold": 1}],
        "test": ["./imagesTs/d.nii.gz"],
    }
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    loaded = load_datalist(tmp_path / "extra.json", root)
    assert loaded == {
        "training": [{"image": [str(root / "imagesTr" / f"b_000{c}.nii.gz") for c in (0, 1)], "case": "b", "fold": 1}],
        "test": [{"image": str(root / "imagesTs" / "d.nii.gz")}],
    }


def test_load_datalist_names_a_file_that_is_not_a_split_object(tmp_path):
    from monai_nacl.data import load_datalist

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"datalist file .*bad\.json is not valid JSON"):
        load_datalist(tmp_path / "bad.json", tmp_path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match=r"datalist file .*list\.json must hold a JSON object of splits, got list"):
        load_datalist(tmp_path / "list.json", tmp_path)


# --- dataset layouts -------------------------------------------------------------------------------------------


def test_layout_split_keeps_a_patients_frames_together_and_is_seeded(tmp_path):
    from monai_nacl.data import build_datalist, write_fixture

    root = write_fixture("acdc", tmp_path / "acdc", num_cases=20)  # 10 patients x (ED, ES)
    splits = build_datalist("acdc", root)
    patients = {k: {item["group"] for item in v} for k, v in splits.items()}
    assert sum(len(v) for v in splits.values()) == 20
    assert [len(patients[k]) for k in ("training", "validation", "test")] == [7, 1, 2]
    assert not (patients["training"] & patients["validation"]) and not (patients["training"] & patients["test"])
    assert not (patients["validation"] & patients["test"])
    assert all(len(v) % 2 == 0 for v in splits.values())
    assert build_datalist("acdc", root) == splits  # seeded: the same split again
    others = [build_datalist("acdc", root, seed=s) for s in (1, 2, 3)]
    assert any(o != splits for o in others)  # and another seed gives another split


def test_layouts_read_channels_in_order(tmp_path):
    from monai_nacl.data import find_cases, write_fixture

    brats = find_cases("brats19", write_fixture("brats19", tmp_path / "b", num_cases=2))
    assert [Path(p).name.rsplit("_", 1)[1] for p in brats[0]["image"]] == [
        "flair.nii.gz",
        "t1.nii.gz",
        "t1ce.nii.gz",
        "t2.nii.gz",
    ]
    mrb = find_cases("mrbrains18", write_fixture("mrbrains18", tmp_path / "m", num_cases=2))
    assert [Path(p).name for p in mrb[0]["image"]] == ["FLAIR.nii.gz", "reg_T1.nii.gz", "reg_IR.nii.gz"]
    prostate = find_cases("msd", write_fixture("msd", tmp_path / "p", num_cases=2))
    assert nib.load(prostate[0]["image"]).shape[-1] == 2


def test_layout_errors_name_the_problem(tmp_path):
    from monai_nacl.data import build_datalist, find_cases, write_fixture

    with pytest.raises(ValueError, match="unknown dataset"):
        find_cases("lits", tmp_path)
    with pytest.raises(ValueError, match="dataset_dir not found"):
        find_cases("kits19", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no kits19 cases found"):
        find_cases("kits19", tmp_path / "empty")
    root = write_fixture("brats19", tmp_path / "b", num_cases=2)
    next(root.rglob("*_t1ce.nii.gz")).unlink()
    with pytest.raises(ValueError, match="BraTS modality not found: .*_t1ce"):
        find_cases("brats19", root)
    with pytest.raises(ValueError, match="fractions"):
        build_datalist("acdc", write_fixture("acdc", tmp_path / "a", num_cases=2), fractions=(1, 1))


def test_check_datalist_accepts_raw_label_values(tmp_path):
    from monai_nacl.data import build_datalist, write_fixture

    items = sum(build_datalist("brats19", write_fixture("brats19", tmp_path, num_cases=3)).values(), [])
    assert check_datalist(items, 4, label_values=[0, 1, 2, 4]) == 3
    with pytest.raises(ValueError, match=r"label values \[4\] outside the classes"):
        check_datalist(items, 4)
