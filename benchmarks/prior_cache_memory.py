"""Cache memory per case of the neighbour prior for the large-volume bundles, float32 against float16.

CacheDataset keeps every transform up to the first random one, so the dataset bundles cache the resampled image,
the label and the C-channel prior tau of each training case. This script builds one case at the resampled size of
a typical case of each dataset (sizes below: the public releases' usual extent and spacing, resampled to the
bundle's ``pixdim``), computes tau with the bundle's own ``train#prior_transform`` settings in float32 and float16,
and prints the bytes each cached tensor takes, the time tau costs, and the largest error float16 adds.

Run: ``python benchmarks/prior_cache_memory.py [--layouts flare21 brats19 kits19]``.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def measure(layout: str) -> dict:
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
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        "| dataset | resampled shape | classes | image MB | label MB | tau float32 MB | tau float16 MB "
        "| case float32 MB | case float16 MB | float16 max error | tau time s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for layout in args.layouts:
        r = measure(layout)
        rows.append(r)
        print(
            f"| {layout} | {'x'.join(map(str, r['shape']))} | {r['classes']} | {r['image_mb']:.0f} | "
            f"{r['label_mb']:.0f} | {r['prior_float32_mb']:.0f} | {r['prior_float16_mb']:.0f} | "
            f"{r['case_float32_mb']:.0f} | {r['case_float16_mb']:.0f} | {r['float16_max_error']:.1e} | "
            f"{r['prior_float32_s']:.1f} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
