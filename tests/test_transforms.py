from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_prior
from monai.data import MetaTensor
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandSpatialCropd

from monai_nacl.transforms import NeighborPrior, NeighborPriord


def _volume(rng, shape=(24, 20, 16)):
    lab = torch.zeros((1, *shape))
    lab[:, 6:16, 5:14, 4:12] = 1
    lab[:, 10:20, 8:17, 6:14] = 2
    return lab


def test_array_transform_matches_reference_and_keeps_meta(rng):
    lab = _volume(rng)
    affine = torch.diag(torch.tensor([2.0, 1.0, 3.0, 1.0]))
    meta_lab = MetaTensor(lab, affine=affine, meta={"filename_or_obj": "case_001.nii.gz"})
    tau = NeighborPrior(3, kernel="gaussian")(meta_lab)
    assert isinstance(tau, MetaTensor)
    assert tau.meta["filename_or_obj"] == "case_001.nii.gz"
    torch.testing.assert_close(tau.affine, meta_lab.affine)
    ref = reference_prior(lab[None], 3, "gaussian")[0].float()
    torch.testing.assert_close(tau.as_tensor(), ref)


def test_numpy_input_and_half_output(rng):
    lab = _volume(rng).numpy().astype(np.uint8)
    tau = NeighborPrior(3, dtype=torch.float16)(lab)
    assert tau.dtype == torch.float16 and tau.shape == (3, 24, 20, 16)
    torch.testing.assert_close(tau.float().sum(0), torch.ones(24, 20, 16), atol=2e-3, rtol=0)


def test_spacing_aware_kernel(rng):
    lab = MetaTensor(_volume(rng), affine=torch.diag(torch.tensor([1.5, 1.5, 10.0, 1.0])))
    t = NeighborPrior(3, neighborhood_mm=4.5)
    assert t.kernel_for(lab)[0] == (3, 3, 1)
    got = t(lab).as_tensor()
    ref = reference_prior(lab.as_tensor()[None], 3, kernel_size=(3, 3, 1))[0].float()
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="spacing"):
        t(lab.as_tensor())


@pytest.mark.parametrize("crop", ["posneg", "spatial"])
def test_dictionary_transform_composes_with_crops_and_flips(crop, rng):
    lab = _volume(rng)
    # the image encodes each voxel's linear index, so the crop location can be read back
    image = torch.arange(lab.numel(), dtype=torch.float32).reshape(lab.shape)
    full_prior = NeighborPrior(3)(lab)
    cropper = (
        RandCropByPosNegLabeld(["image", "label", "prior"], "label", (10, 8, 6), num_samples=3)
        if crop == "posneg"
        else RandSpatialCropd(["image", "label", "prior"], (10, 8, 6), random_size=False)
    )
    pipeline = Compose(
        [
            NeighborPriord("label", num_classes=3, prior_key="prior"),
            cropper,
            RandFlipd(["image", "label", "prior"], prob=1.0, spatial_axis=0),
        ]
    )
    pipeline.set_random_state(7)
    out = pipeline({"image": MetaTensor(image), "label": MetaTensor(lab)})
    for sample in out if isinstance(out, list) else [out]:
        idx = sample["image"].as_tensor().long()[0]
        expected = full_prior.reshape(3, -1)[:, idx.flatten()].reshape(3, *idx.shape)
        torch.testing.assert_close(sample["prior"].as_tensor(), expected)
        assert torch.equal(sample["label"].as_tensor()[0], lab.reshape(-1)[idx.flatten()].reshape(idx.shape))


def test_dictionary_errors_name_the_key(rng):
    lab = _volume(rng)
    lab[0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"key 'label'.*label values \[5"):
        NeighborPriord("label", num_classes=3)({"label": lab})
    with pytest.raises(ValueError, match="1,\\*spatial"):
        NeighborPrior(3)(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="one entry per key"):
        NeighborPriord(["a", "b"], 3, prior_key="prior")
    ok = NeighborPriord("label", num_classes=3, ignore_index=5)({"label": lab})
    assert ok["prior"][:, 0, 0, 0].sum() == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA device not present on this machine")
def test_cuda_tensor_stays_on_device(rng):
    lab = MetaTensor(_volume(rng)).cuda()
    tau = NeighborPrior(3)(lab)
    assert tau.device.type == "cuda"
    torch.testing.assert_close(tau.cpu().as_tensor(), NeighborPrior(3)(lab.cpu()).as_tensor())


def test_safe_spacingd_keeps_string_keys_and_inverts(tmp_path):
    import nibabel as nib
    from monai.transforms import Compose, Invertd, LoadImaged, Spacingd

    from monai_nacl.transforms import SafeSpacingd

    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(12, 10, 5).astype(np.float32), np.diag([0.8, 0.8, 3.0, 1.0])), path)
    load = LoadImaged("image", ensure_channel_first=True, image_only=True)
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        Spacingd("image", pixdim=(1.6, 1.6, 1.5))(load({"image": str(path), "image_path": str(path)}))
    pre = Compose([load, SafeSpacingd("image", pixdim=(1.6, 1.6, 1.5))])
    out = pre({"image": str(path), "image_path": str(path), "label_path": "x"})
    plain = Spacingd("image", pixdim=(1.6, 1.6, 1.5))(load({"image": str(path)}))  # MONAI without the extra key
    assert torch.equal(out["image"].as_tensor(), plain["image"].as_tensor())
    assert out["image_path"] == str(path) and out["label_path"] == "x"
    assert np.allclose(out["image"].pixdim.tolist(), [1.6, 1.6, 1.5])
    out["pred"] = out["image"].clone()
    back = Invertd("pred", transform=pre, orig_keys="image")(out)
    assert back["pred"].shape == (1, 12, 10, 5)
