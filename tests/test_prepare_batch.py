"""The prior computed on the device from haloed patches (``monai_nacl.prepare_batch.PriorOnDevice``): exact against
the whole volume's prior, refused where it cannot be, and wired into every bundle by ``prior_on_device.json``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import bundle_workflow, tiny_bundle_overrides
from monai.transforms import BorderPad

from monai_nacl.neighbor_prior import neighbor_prior
from monai_nacl.prepare_batch import PriorOnDevice

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/prior_on_device.json"))


def _blobs(shape, classes, seed, ignore_index=None):
    """A label volume with structures several voxels across, so most windows see one class and edges see several."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (1, 1, *[max(2, s // 3) for s in shape]), generator=g).float()
    label = torch.nn.functional.interpolate(coarse, size=shape, mode="nearest")
    if ignore_index is not None:
        label[torch.rand(label.shape, generator=g) < 0.1] = ignore_index
    return label


@pytest.mark.parametrize(
    "options",
    [
        {"kernel": "mean", "kernel_size": 3},
        {"kernel": "mean", "kernel_size": (5, 3, 1)},
        {"kernel": "gaussian", "kernel_size": 5, "sigma": (1.0, 0.7, 1.5)},
        {"kernel": "mean", "kernel_size": 3, "padding": "background"},
        {"kernel": "mean", "kernel_size": 3, "ignore_index": 255},
    ],
)
def test_patch_prior_is_the_crop_of_the_volume_prior(options):
    """Pad the volume by the halo, crop patch + 2 halo anywhere (borders included): τ of the patch equals the
    whole volume's τ there, to the last bit."""
    shape, patch, classes = (17, 14, 11), (8, 6, 5), 3
    label = _blobs(shape, classes, seed=0, ignore_index=options.get("ignore_index"))
    image = torch.randn(1, 2, *shape)
    prepare = PriorOnDevice(classes, patch_size=patch, **options)
    full = neighbor_prior(
        label, classes, prepare.kernel, options["kernel_size"], options.get("sigma", 1.0), prepare.padding,
        prepare.ignore_index,
    )  # fmt: skip
    padded_label = BorderPad(prepare.halo, mode=prepare.label_pad_mode)(label[0])
    padded_image = BorderPad(prepare.halo, mode="constant")(image[0])
    g = torch.Generator().manual_seed(1)
    starts = [(0, 0, 0), tuple(s - p for s, p in zip(shape, patch))]
    starts += [
        tuple(int(torch.randint(0, s - p + 1, (1,), generator=g)) for s, p in zip(shape, patch)) for _ in range(6)
    ]
    for start in starts:
        window = tuple(slice(s, s + c) for s, c in zip(start, prepare.crop_size))
        batch = {
            "image": padded_image[(slice(None), *window)][None],
            "label": padded_label[(slice(None), *window)][None],
        }
        out_image, out_label = prepare(batch, torch.device("cpu"))
        inner = tuple(slice(s, s + p) for s, p in zip(start, patch))
        assert torch.equal(batch["prior"], full[(slice(None), slice(None), *inner)]), start
        assert torch.equal(out_label, label[(slice(None), slice(None), *inner)])
        assert torch.equal(out_image, image[(slice(None), slice(None), *inner)])


def test_halo_and_crop_size_follow_the_spacing():
    prepare = PriorOnDevice(4, neighborhood_mm=4.5, spacing=(1.5, 1.5, 4.5), patch_size=(32, 32, 16))
    assert prepare.kernel_size == (3, 3, 1) and prepare.halo == [1, 1, 0] and prepare.crop_size == [34, 34, 16]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"padding": "zeros"}, "padding must be one of"),
        ({"neighborhood_mm": 3.0}, "neighborhood_mm needs spacing"),
        ({"neighborhood_mm": 3.0, "spacing": (1.0, -1.0, 1.0)}, "spacing\\[1\\] must be > 0.0, got -1.0"),
        ({"neighborhood_mm": 3.0, "spacing": 1.5}, "spacing must be a non-empty sequence of numbers"),
        ({"neighborhood_mm": 3.0, "spacing": "1.5"}, "spacing must be a non-empty sequence of numbers"),
        ({"neighborhood_mm": 3.0, "spacing": (1.0, float("nan"), 1.0)}, "spacing\\[1\\] must be finite"),
        ({"patch_size": (8, "a", 8)}, "patch_size must be"),
        ({"patch_size": (8, None, 8)}, "patch_size must be"),
        ({"patch_size": (8, float("nan"), 8)}, "patch_size must be"),
        ({"patch_size": (8, 8.5, 8)}, "patch_size must be"),
        ({"prior_key": "label"}, "image_key, label_key and prior_key must differ"),
        ({"image_key": "label"}, "image_key, label_key and prior_key must differ"),
        ({"prior_key": "image"}, "image_key, label_key and prior_key must differ"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"patch_size": (8, 0, 8)}, "patch_size must be"),
        ({"patch_size": "8"}, "patch_size must be"),
        ({"kernel": "box"}, "kernel must be one of"),
        ({"dtype": torch.int64}, "dtype must be a floating"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PriorOnDevice(3, **kwargs)


def test_patch_size_from_arrays_and_tensors():
    import numpy as np

    for size in (np.array([8, 8, 8]), torch.tensor([8, 8, 8]), [np.int64(8)] * 3, [8.0, 8.0, 8.0]):
        assert PriorOnDevice(3, patch_size=size).patch_size == (8, 8, 8)


def test_bad_batches_are_named():
    prepare = PriorOnDevice(3, kernel_size=3, patch_size=(4, 4, 4))
    with pytest.raises(ValueError, match="the batch must be a dict of collated tensors"):
        prepare((torch.zeros(2, 1, 6, 6, 6), torch.zeros(2, 1, 6, 6, 6)))
    good = {"image": torch.zeros(2, 1, 6, 6, 6), "label": torch.zeros(2, 1, 6, 6, 6)}
    with pytest.raises(ValueError, match="crop training patches at patch_size \\+ 2 \\* halo = \\[6, 6, 6\\]"):
        prepare({"image": torch.zeros(2, 1, 4, 4, 4), "label": torch.zeros(2, 1, 4, 4, 4)})
    with pytest.raises(ValueError, match="the batch has no 'label'"):
        prepare({"image": good["image"]})
    with pytest.raises(ValueError, match="label must be B,1,\\*spatial"):
        prepare({"image": good["image"], "label": torch.zeros(2, 3, 6, 6, 6)})
    bad = good["label"].clone()
    bad[1, 0, 2, 2, 2] = 5
    with pytest.raises(ValueError, match="batch\\['label'\\]"):
        prepare({"image": good["image"], "label": bad})
    with pytest.raises(ValueError, match="no larger than twice the halo"):
        PriorOnDevice(3, kernel_size=3)({"image": torch.zeros(1, 1, 2, 6, 6), "label": torch.zeros(1, 1, 2, 6, 6)})


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_overlay_uses_the_kernel_of_the_cached_prior(bundle):
    """The overlay's kernel is the one train.json's NeighborPriord uses on a volume at the bundle's spacing."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    cached, on_device = ConfigParser(), ConfigParser()
    cached.read_config(str(bundle / "configs" / "train.json"))
    on_device.read_config([str(bundle / "configs" / n) for n in ("train.json", "prior_on_device.json")])
    transform = cached.get_parsed_content("train#prior_transform")
    prepare = on_device.get_parsed_content("train#prior_on_device")
    spacing = cached.get_parsed_content("pixdim") if "pixdim" in cached else [1.0, 1.0, 1.0]
    label = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([*spacing, 1.0])))
    sizes, sigma = transform.prior.kernel_for(label)
    assert tuple(prepare._sizes(3)) == tuple(sizes) and prepare.kernel == transform.prior.kernel
    assert prepare.padding == transform.prior.padding and prepare.ignore_index == transform.prior.ignore_index
    assert on_device.get_parsed_content("train#crop_size") == prepare.crop_size
    assert list(prepare.patch_size) == list(on_device.get_parsed_content("patch_size"))


def test_phantom_bundle_trains_with_the_prior_on_the_device(tmp_path):
    """A real SupervisedTrainer epoch with the overlay: every batch's τ is computed from the haloed patch, has the
    network's patch size and is what the loss receives."""
    from monai.engines.utils import IterationEvents

    bundle = ROOT / "bundles" / "phantom_nacl_segmentation"
    overrides = tiny_bundle_overrides(tmp_path)  # validated after the epoch too: on whole volumes
    wf = bundle_workflow(bundle, ["train.json", "prior_on_device.json"], "train", **overrides)
    trainer, loss = wf.parser.get_parsed_content("train#trainer"), wf.parser.get_parsed_content("loss")
    patch = list(wf.parser.get_parsed_content("patch_size"))
    seen = []

    def check(engine):
        prior, label = engine.state.batch["prior"], engine.state.output["label"]
        assert list(prior.shape[2:]) == patch == list(label.shape[2:])
        assert torch.allclose(prior.sum(1), torch.ones_like(prior[:, 0]))
        # away from the patch's edges τ depends on the patch alone: there it is the loss's own prior of the label
        inner = (
            slice(None),
            slice(None),
            *[slice(h, -h or None) for h in wf.parser.get_parsed_content("train#prior_on_device").halo],
        )
        assert torch.equal(prior[inner], loss.prior(label)[inner])
        seen.append(loss._next_prior is prior)

    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, check)
    wf.run()
    assert seen and all(seen)
    assert wf.parser.get_parsed_content("train#trainer").prepare_batch is wf.parser.get_parsed_content(
        "train#prior_on_device"
    )


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_overlay_leaves_validation_alone(bundle):
    """Validation and calibration run on whole volumes: the overlay must not pad or crop them."""
    from monai.bundle import ConfigParser

    plain, on_device = ConfigParser(), ConfigParser()
    plain.read_config(str(bundle / "configs" / "train.json"))
    on_device.read_config([str(bundle / "configs" / n) for n in ("train.json", "prior_on_device.json")])
    for config in (plain, on_device):
        config["dataset_dir"] = "/nonexistent"  # nothing is read: only the transforms are built
    describe = [type(t).__name__ for t in on_device.get_parsed_content("validate#preprocessing").transforms]
    assert describe == [type(t).__name__ for t in plain.get_parsed_content("validate#preprocessing").transforms]
    assert "BorderPadd" not in describe
