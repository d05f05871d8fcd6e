"""Network and patch plans from a dataset's fingerprint, by nnU-Net's rules, for MONAI's ``DynUNet``.

The fingerprint is the median voxel spacing and the median image shape of the training cases (read from the
file headers). The plan resamples to the median spacing; the patch covers the median image (rounded up so the
network's strides divide it) within a voxel budget; an axis is downsampled while its spacing is at most twice
the finest one and its feature map stays at least ``min_feature_size`` voxels, and gets 1-voxel kernels while
it is coarser than that (anisotropic data such as 0.6 × 0.6 × 3.6 mm prostate MRI). ``python -m
monai_nacl.planning DATALIST DATASET_DIR`` prints the plan of a datalist's training split.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_nacl.input_checks import check_integer, check_number_sequence

__all__ = ["dataset_fingerprint", "plan_dynunet"]

FILTERS = (32, 64, 128, 256, 320, 320, 320)


def dataset_fingerprint(items: Sequence[dict], image_key: str = "image") -> dict:
    """Median spacing and median shape (spatial axes, as stored) of the images in ``items``.

    Raises:
        ValueError: ``items`` is not a non-empty list of entries with an ``image_key`` path, or an image cannot be
            read, has another number of axes than the first, or a spacing that is not finite and positive (the
            file is named).
    """
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
        raise ValueError(f"items must be a list of datalist entries (dicts), got {type(items).__name__}.")
    if not items:
        raise ValueError("no cases to fingerprint.")
    spacings, shapes = [], []
    for i, item in enumerate(items):
        path = item.get(image_key) if isinstance(item, dict) else None
        path = path[0] if isinstance(path, (list, tuple)) and path else path
        if not isinstance(path, (str, Path)):
            raise ValueError(f"case {i} of the datalist has no {image_key!r} path: {item!r}")
        try:
            header = nib.load(str(path)).header
        except Exception as e:  # nibabel raises several types for unreadable files
            raise ValueError(f"cannot read {path}: {e}") from e
        spacings.append([float(z) for z in header.get_zooms()[:3]])
        shapes.append([int(s) for s in header.get_data_shape()[:3]])
        if len(shapes[-1]) != len(shapes[0]):
            raise ValueError(f"{path} has {len(shapes[-1])} spatial axes, the first case {len(shapes[0])}.")
        if not all(math.isfinite(z) and z > 0 for z in spacings[-1]):
            raise ValueError(f"{path}: its header's voxel spacing {spacings[-1]} is not finite and positive.")
    return {
        "cases": len(items),
        "median_spacing": [float(v) for v in np.median(np.array(spacings), 0)],
        "median_shape": [float(v) for v in np.median(np.array(shapes), 0)],
    }


def plan_dynunet(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    max_patch_voxels: int = 128**3,
    min_feature_size: int = 4,
    max_levels: int = 6,
    max_filters: int = 320,
) -> dict:
    """The ``DynUNet`` arguments and patch size for data of this median spacing and shape (at that spacing).

    Args:
        spacing: target voxel spacing (mm), e.g. the median spacing of the training cases.
        median_shape: median image shape at that spacing.
        max_patch_voxels: budget for the patch (the largest axis shrinks until it fits).
        min_feature_size: an axis is not downsampled below this many voxels.
        max_levels: most resolution levels (the first at full resolution).
        max_filters: most feature maps at any level (nnU-Net's 3D cap is 320; a lower cap keeps the weights small).

    Returns:
        ``{"target_spacing", "patch_size", "kernel_size", "strides", "upsample_kernel_size", "filters",
        "max_filters"}``.

    Raises:
        ValueError: lengths differ; a spacing or shape that is not a sequence of finite positive numbers;
            ``max_filters``, ``max_patch_voxels`` or ``min_feature_size`` not a positive integer; ``max_levels``
            not an integer from 1 to 7 (one filter count per level).
    """
    max_filters = check_integer(max_filters, "max_filters", minimum=1, whole_floats=True)
    max_patch_voxels = check_integer(max_patch_voxels, "max_patch_voxels", minimum=1, whole_floats=True)
    min_feature_size = check_integer(min_feature_size, "min_feature_size", minimum=1, whole_floats=True)
    max_levels = check_integer(max_levels, "max_levels", minimum=1, maximum=len(FILTERS), whole_floats=True)
    spacing = check_number_sequence(spacing, "spacing", minimum=0.0, exclusive_minimum=True)
    shape = check_number_sequence(median_shape, "median_shape", minimum=0.0, exclusive_minimum=True)
    if len(spacing) != len(shape):
        raise ValueError(f"spacing and median_shape must have the same length, got {spacing} and {shape}.")
    patch = [max(int(math.ceil(s)), 1) for s in shape]
    while math.prod(patch) > max_patch_voxels:
        axis = int(np.argmax(np.array(patch) * np.array(spacing)))  # the physically longest axis
        patch[axis] = max(patch[axis] - 1, 1)

    kernels, strides = [], [[1] * len(spacing)]
    current_spacing, current_size = list(spacing), [float(p) for p in patch]
    while len(strides) < max_levels:
        finest = min(current_spacing)
        kernels.append([3 if s <= 2 * finest else 1 for s in current_spacing])
        stride = [
            2 if s <= 2 * finest and size / 2 >= min_feature_size else 1
            for s, size in zip(current_spacing, current_size)
        ]
        if all(st == 1 for st in stride):
            break
        strides.append(stride)
        current_spacing = [s * st for s, st in zip(current_spacing, stride)]
        current_size = [size / st for size, st in zip(current_size, stride)]
    else:
        finest = min(current_spacing)
        kernels.append([3 if s <= 2 * finest else 1 for s in current_spacing])
    # the patch must be divisible by the total stride of each axis
    total = [math.prod(st[a] for st in strides) for a in range(len(spacing))]
    patch = [int(math.ceil(p / t) * t) for p, t in zip(patch, total)]
    return {
        "target_spacing": spacing,
        "patch_size": patch,
        "kernel_size": kernels,
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "filters": [min(f, max_filters) for f in FILTERS[: len(strides)]],
        "max_filters": max_filters,
    }


def main(argv: list[str] | None = None) -> dict:
    from monai_nacl.data import load_datalist

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datalist", help="datalist JSON (its 'training' split is fingerprinted)")
    ap.add_argument("dataset_dir", help="folder the datalist's relative paths start from")
    ap.add_argument("--max-patch-voxels", type=int, default=128**3)
    ap.add_argument("--max-filters", type=int, default=320, help="most feature maps at any level")
    args = ap.parse_args(argv)
    try:
        datalist = load_datalist(args.datalist, args.dataset_dir)
        if "training" not in datalist:
            raise ValueError(f"{args.datalist} has no 'training' split (keys: {sorted(datalist)}).")
        fingerprint = dataset_fingerprint(datalist["training"])
        plan = plan_dynunet(
            fingerprint["median_spacing"],
            fingerprint["median_shape"],
            args.max_patch_voxels,
            max_filters=args.max_filters,
        )
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    print(json.dumps({"fingerprint": fingerprint, "plan": plan}, indent=4))
    return plan


if __name__ == "__main__":
    main()
