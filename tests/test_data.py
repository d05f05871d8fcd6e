from __future__ import annotations

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
