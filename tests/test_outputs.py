"""SelectOutputd: the output a client (MONAI Label) receives, by output_kind."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from monai_nacl.transforms import OUTPUT_KINDS, SelectOutputd


def _case():
    torch.manual_seed(0)
    prob = torch.softmax(torch.randn(3, 4, 5, 6), 0)
    pred = MetaTensor(prob.argmax(0, keepdim=True).float(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    outer = torch.zeros(2, 4, 5, 6, dtype=torch.uint8)
    outer[0, :2] = 1  # structure 1
    outer[1, 1:3] = 1  # structure 2; row 1 is in both
    inner = torch.zeros_like(outer)
    inner[1, 3] = 1
    entropy = torch.rand(1, 4, 5, 6)
    return {"pred": pred, "prob": prob, "entropy": entropy, "conformal_outer": outer, "conformal_inner": inner}


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_each_kind(kind):
    d = _case()
    out = SelectOutputd("pred", output_kind=[kind, "segmentation"])(d)  # MONAI Label passes the choices
    assert out["result"]["output_kind"] == kind
    if kind == "segmentation":
        assert out["pred"].dtype == torch.uint8 and torch.equal(out["pred"].long(), d["pred"].long())
    elif kind == "probabilities":
        assert torch.equal(out["pred"], d["prob"])
    elif kind == "entropy":
        assert torch.equal(out["pred"], d["entropy"])
    else:
        masks = d["conformal_outer" if kind == "outer_mask" else "conformal_inner"].bool()
        expected = torch.zeros(1, 4, 5, 6, dtype=torch.uint8)
        for v in torch.cartesian_prod(*[torch.arange(n) for n in (4, 5, 6)]):
            i, j, k = v.tolist()
            inside = [c for c in (1, 2) if masks[c - 1, i, j, k]]
            if inside:
                expected[0, i, j, k] = max(inside, key=lambda c: d["prob"][c, i, j, k])
        assert out["pred"].dtype == torch.uint8 and torch.equal(torch.as_tensor(out["pred"]), expected)
        assert isinstance(out["pred"], MetaTensor) and torch.equal(out["pred"].affine, d["pred"].affine)


def test_mask_kind_without_conformal_masks_names_the_fix():
    d = _case()
    del d["conformal_outer"]
    with pytest.raises(ValueError, match="no conformal record.*calibrate.json"):
        SelectOutputd("pred", output_kind="outer_mask")(d)


def test_mask_classes_and_bad_kind():
    d = _case()
    out = SelectOutputd("pred", output_kind="inner_mask", mask_classes=[2, 1])(d)
    assert set(torch.unique(torch.as_tensor(out["pred"])).tolist()) == {0, 1}  # channel 1 is now class 1
    with pytest.raises(ValueError, match="do not match 2 mask channels"):
        SelectOutputd("pred", output_kind="inner_mask", mask_classes=[1])(d)
    with pytest.raises(ValueError):
        SelectOutputd("pred", output_kind="contours")


def test_mask_labels_use_the_raw_label_values():
    d = _case()
    out = SelectOutputd("pred", output_kind="outer_mask", label_values=[0, 1, 4])(d)  # e.g. BraTS maps 3 -> 4
    values = set(torch.unique(torch.as_tensor(out["pred"])).tolist())
    assert values == {0, 1, 4}
    with pytest.raises(ValueError, match="uint8"):
        SelectOutputd("pred", output_kind="outer_mask", label_values=[0, 1, 300])
    with pytest.raises(ValueError, match="no value for mask classes"):
        SelectOutputd("pred", output_kind="outer_mask", label_values=[0, 1])(d)
