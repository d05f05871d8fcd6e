"""DynUNet plans from a dataset fingerprint (nnU-Net's rules), and the deep-supervision loss."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import HIPPOCAMPUS

from monai_nacl.losses import DeepSupervisionLoss, DiceCELoss, NACLLoss
from monai_nacl.planning import dataset_fingerprint, plan_dynunet

ROOT = Path(__file__).resolve().parents[1]
HIPPO_BUNDLE = ROOT / "bundles" / "hippocampus_mri_nacl_segmentation"


def test_isotropic_plan():
    plan = plan_dynunet([1.0, 1.0, 1.0], [35, 50, 36])
    assert plan["patch_size"] == [40, 56, 40]  # the median image, rounded up to the total stride 8
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert plan["kernel_size"] == [[3, 3, 3]] * 4 and plan["upsample_kernel_size"] == plan["strides"][1:]
    assert plan["filters"] == [32, 64, 128, 256] and plan["max_filters"] == 320
    assert plan_dynunet([1.0, 1.0, 1.0], [35, 50, 36], max_filters=192)["filters"] == [32, 64, 128, 192]
    with pytest.raises(ValueError, match="max_filters"):
        plan_dynunet([1.0, 1.0, 1.0], [35, 50, 36], max_filters=0)


def test_anisotropic_plan_keeps_the_coarse_axis_until_it_catches_up():
    plan = plan_dynunet([0.625, 0.625, 3.6], [320, 320, 20])
    assert plan["kernel_size"][0] == [3, 3, 1] and plan["strides"][1] == [2, 2, 1]
    spacing = [0.625, 0.625, 3.6]
    for stride, kernel in zip(plan["strides"], plan["kernel_size"]):
        spacing = [s * st for s, st in zip(spacing, stride)]  # the spacing at this level
        assert kernel[2] == (1 if spacing[2] > 2 * min(spacing) else 3)
    for axis in range(3):
        total = math.prod(s[axis] for s in plan["strides"])
        assert plan["patch_size"][axis] % total == 0
        assert plan["patch_size"][axis] / total >= 2  # feature maps stay at least min_feature_size / 2
    assert math.prod(plan["patch_size"]) <= 128**3


def test_patch_budget_and_bad_input():
    plan = plan_dynunet([1.0, 1.0, 1.0], [300, 300, 300], max_patch_voxels=96**3)
    assert math.prod(plan["patch_size"]) <= 96**3 * 1.2 and len(plan["strides"]) <= 6
    with pytest.raises(ValueError, match="same length"):
        plan_dynunet([1.0, 1.0], [10, 10, 10])
    with pytest.raises(ValueError, match=r"spacing\[1\] must be > 0.0, got 0.0"):
        plan_dynunet([1.0, 0.0, 1.0], [10, 10, 10])
    with pytest.raises(ValueError, match="no cases"):
        dataset_fingerprint([])


def test_plan_takes_whole_floats_arrays_and_tensors():
    import numpy as np
    import torch

    plain = plan_dynunet([1.0, 1.0, 1.0], [35, 50, 36], max_patch_voxels=10**6, min_feature_size=4)
    assert plan_dynunet(torch.tensor([1.0, 1.0, 1.0]), np.array([35, 50, 36]), 1e6, 4.0) == plain


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_patch_voxels": 0}, "max_patch_voxels must be >= 1, got 0"),  # used to loop forever
        ({"max_patch_voxels": -5}, "max_patch_voxels"),
        ({"max_levels": 8}, "max_levels must be <= 7, got 8"),  # one filter count per level
        ({"max_levels": 0}, "max_levels"),
        ({"min_feature_size": 0}, "min_feature_size"),
        ({"max_filters": "a"}, "max_filters"),
        ({"max_filters": float("nan")}, "max_filters"),
        ({"spacing": [float("nan"), 1, 1]}, "spacing[0] must be finite, got nan"),
        ({"spacing": [float("inf"), 1, 1]}, "spacing[0] must be finite, got inf"),
        ({"median_shape": [64, float("nan"), 64]}, "median_shape[1] must be finite, got nan"),
        ({"spacing": "111"}, "spacing must be a non-empty sequence of numbers"),
        ({"median_shape": [64, "a", 64]}, "median_shape[1] must be a real number"),
    ],
)
def test_plan_refuses_bad_arguments(kwargs, message):
    args = {"spacing": [1.0, 1.0, 1.0], "median_shape": [64, 64, 64], **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_dynunet(**args)


def test_fingerprint_refuses_bad_datalists(tmp_path):
    import nibabel as nib
    import numpy as np

    with pytest.raises(ValueError, match="list of datalist entries"):
        dataset_fingerprint({"training": []})
    with pytest.raises(ValueError, match="case 0 of the datalist has no 'image' path"):
        dataset_fingerprint([{"label": "x.nii.gz"}])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="case 1 of the datalist has no 'image' path"):
        dataset_fingerprint([{"image": str(tmp_path / "a.nii.gz")}, "b.nii.gz"])
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "b.nii.gz")
    with pytest.raises(ValueError, match="b.nii.gz has 2 spatial axes, the first case 3"):
        dataset_fingerprint([{"image": str(tmp_path / f)} for f in ("a.nii.gz", "b.nii.gz")])
    bad = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    bad.header.set_zooms((1.0, float("nan"), 1.0))
    nib.save(bad, tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="c.nii.gz: its header's voxel spacing"):
        dataset_fingerprint([{"image": str(tmp_path / "c.nii.gz")}])


def test_planning_command_reports_errors_without_a_traceback(tmp_path, capsys):
    from monai_nacl.planning import main

    (tmp_path / "data").mkdir()
    (tmp_path / "dl.json").write_text('{"validation": []}')
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "dl.json"), str(tmp_path / "data")])
    assert exit_info.value.code == 2 and "has no 'training' split" in capsys.readouterr().err
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "data" / "a.nii.gz")
    (tmp_path / "dl.json").write_text('{"training": [{"image": "a.nii.gz"}]}')
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "dl.json"), str(tmp_path / "data"), "--max-patch-voxels", "0"])
    assert exit_info.value.code == 2 and "max_patch_voxels must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason=f"MSD Task04 Hippocampus not at {HIPPOCAMPUS}")
def test_the_shipped_recipe_is_the_plan_of_its_training_data():
    from monai_nacl.data import load_datalist

    training = load_datalist(HIPPO_BUNDLE / "configs" / "datalist.json", HIPPOCAMPUS)["training"]
    fingerprint = dataset_fingerprint(training)
    assert fingerprint["cases"] == 140 and fingerprint["median_spacing"] == [1.0, 1.0, 1.0]
    stored = json.loads((HIPPO_BUNDLE / "configs" / "dynunet.json").read_text())["plan"]
    assert stored == plan_dynunet(
        fingerprint["median_spacing"], fingerprint["median_shape"], max_filters=stored["max_filters"]
    )


def test_deep_supervision_loss_weights_every_head_with_the_prior():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 1, 8, 8, 8))
    heads = torch.randn(2, 3, 3, 8, 8, 8)
    nacl = NACLLoss(num_classes=3)
    prior = nacl.prior(y)
    loss = DeepSupervisionLoss(nacl)
    expected = sum(w * nacl(heads[:, i], y, prior) for i, w in enumerate([4 / 7, 2 / 7, 1 / 7]))
    loss.use_prior_once(prior)
    torch.testing.assert_close(loss(heads, y), expected)
    # a plain output passes through; a list of heads works too
    torch.testing.assert_close(loss(heads[:, 0], y), nacl(heads[:, 0], y))
    torch.testing.assert_close(
        DeepSupervisionLoss(nacl, weights=[1, 0, 0])(list(heads.unbind(1)), y), nacl(heads[:, 0], y)
    )
    with pytest.raises(ValueError, match="3 deep-supervision heads, weights has 2"):
        DeepSupervisionLoss(nacl, weights=[1, 1])(heads, y)
    with pytest.raises(ValueError, match="takes no prior"):
        DeepSupervisionLoss(DiceCELoss(num_classes=3))(heads, y, prior)
    with pytest.raises(ValueError, match="positive sum"):
        DeepSupervisionLoss(nacl, weights=[0, 0])
