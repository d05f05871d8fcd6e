"""Cache memory per case of the neighbour prior for the large-volume bundles, float32 against float16.

CacheDataset keeps every transform up to the first random one, so the dataset bundles cache the resampled image,
the label and the C-channel prior tau of each training case. This script builds one case at the resampled size of
a typical case of each dataset (sizes below: the public releases' usual extent and spacing, resampled to the
bundle's ``pixdim``), computes tau with the bundle's own ``train#prior_transform`` settings in float32 and float16,
and prints the bytes each cached tensor takes, the time tau costs, and the largest error float16 adds. With the
``prior_on_device.json`` overlay nothing C-channel is cached: the case is its image and label padded by the halo, and
tau costs one filter of each training batch on the device (timed here on this machine for one batch of haloed
patches at the bundle's patch size and batch size).

Run: ``python benchmarks/prior_cache_memory.py [--layouts flare21 brats19 kits19] [--device cuda]`` (``--device``:
where the batch's tau is timed, the median of 5 after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# typical raw extent (mm) of one case: FLARE21 abdominal CT 512 x 512 x ~100 slices at ~0.8 x 0.8 x 2.5 mm;
# BraTS 2019 240 x 240 x 155 at 1 mm; KiTS19 512 x 512 x ~110 slices at ~0.78 x 0.78 x 3 mm (axes as resampled)
LAYOUTS = {
    "flare21": ("flare21_abdominal_ct_nacl_segmentation", (410.0, 410.0, 250.0)),
    "brats19": ("brats19_brain_tumor_mri_nacl_segmentation", (240.0, 240.0, 155.0)),
    "kits19": ("kits19_kidney_ct_nacl_segmentation", (400.0, 400.0, 330.0)),
}


def _mb(t: torch.Tensor) -> float:
    return t.numel() * t.element_size() / 2**20


def measure(layout: str, device: torch.device | None = None) -> dict:
    from monai.data import MetaTensor

    from monai_nacl.transforms import NeighborPrior

    bundle, extent_mm = LAYOUTS[layout]
    train = json.loads((ROOT / "bundles" / bundle / "configs" / "train.json").read_text())
    pixdim, classes = train["pixdim"], train["num_classes"]
    channels = train["network_def"]["network"]["in_channels"]
    shape = tuple(round(e / p) for e, p in zip(extent_mm, pixdim))
    neighborhood_mm = 3 * min(pixdim)  # the bundles' "neighborhood_mm": "$3 * min(@pixdim)"
    torch.manual_seed(0)
    # a label with structures of realistic extent (blobs), so boundaries occupy a realistic share of voxels
    coarse = torch.randint(0, classes, (1, 1, *[max(2, s // 16) for s in shape])).float()
    label = torch.nn.functional.interpolate(coarse, size=shape, mode="nearest")[0]
    image = torch.zeros(channels, *shape)
    row = {"layout": layout, "shape": shape, "pixdim": pixdim, "classes": classes, "channels": channels}
    row["image_mb"], row["label_mb"] = _mb(image), _mb(label)
    priors = {}
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        transform = NeighborPrior(classes, kernel="mean", neighborhood_mm=neighborhood_mm, dtype=dtype)
        start = time.perf_counter()
        # NeighborPrior reads the spacing (for neighborhood_mm) from the MetaTensor's affine
        affine = torch.diag(torch.tensor([*pixdim, 1.0], dtype=torch.float64))
        priors[name] = transform(MetaTensor(label, affine=affine))
        row[f"prior_{name}_s"] = time.perf_counter() - start
        row[f"prior_{name}_mb"] = _mb(priors[name])
    row["float16_max_error"] = (priors["float16"].float() - priors["float32"]).abs().max().item()
    for name in ("float32", "float16"):
        row[f"case_{name}_mb"] = row["image_mb"] + row["label_mb"] + row[f"prior_{name}_mb"]
    # the prior on the device: image and label padded by the halo are cached; tau is computed per batch of patches
    from monai_nacl.prepare_batch import PriorOnDevice

    prepare = PriorOnDevice(classes, neighborhood_mm=neighborhood_mm, spacing=pixdim, patch_size=train["patch_size"])
    padded = [s + 2 * h for s, h in zip(shape, prepare.halo)]
    voxels = torch.Size(padded).numel()
    row["case_on_device_mb"] = voxels * (channels + 1) * 4 / 2**20
    batch_size = train["train"]["dataloader"]["batch_size"]
    patch_label = label[None, :, : prepare.crop_size[0], : prepare.crop_size[1], : prepare.crop_size[2]]
    batch = {"image": torch.zeros(batch_size, channels, *patch_label.shape[2:])}
    batch["label"] = patch_label.expand(batch_size, *patch_label.shape[1:]).clone()
    device = torch.device("cpu") if device is None else device
    batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        prepare(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row["batch_prior_s"] = statistics.median(times[1:])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--device", default="cpu", help="where one batch's tau on the device is timed (cpu, cuda)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch tau on {device}"
    )
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(
        "| dataset | resampled shape | classes | image MB | label MB | tau float32 MB | tau float16 MB "
        "| case float32 MB | case float16 MB | float16 max error | tau time s | case on device MB | batch tau s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for layout in args.layouts:
        r = measure(layout, device)
        rows.append(r)
        print(
            f"| {layout} | {'x'.join(map(str, r['shape']))} | {r['classes']} | {r['image_mb']:.0f} | "
            f"{r['label_mb']:.0f} | {r['prior_float32_mb']:.0f} | {r['prior_float16_mb']:.0f} | "
            f"{r['case_float32_mb']:.0f} | {r['case_float16_mb']:.0f} | {r['float16_max_error']:.1e} | "
            f"{r['prior_float32_s']:.1f} | {r['case_on_device_mb']:.0f} | {r['batch_prior_s']:.2f} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
