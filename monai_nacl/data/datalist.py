"""Datalists on disk: synthetic phantom datasets and integrity checks that fail fast, naming the case."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from monai_nacl.data.phantoms import make_phantom

__all__ = ["phantom_datalist", "check_datalist", "load_datalist"]


def phantom_datalist(
    dataset_dir: str | Path,
    num_train: int = 16,
    num_val: int = 4,
    num_test: int = 4,
    shape: Sequence[int] = (40, 40, 40),
    seed: int = 0,
) -> dict[str, list[dict[str, str]]]:
    """Write seeded phantoms as NIfTI (once; existing files are reused) and return the datalist.

    Files go to ``dataset_dir/imagesTr`` and ``labelsTr`` as ``phantom_NNNN.nii.gz`` (1 mm, identity
    affine); splits use disjoint seeds (``seed + i``, ``seed + 1000 + i``, ``seed + 2000 + i``), so the same
    arguments always give the same data. ``dataset_dir/datalist.json`` records the result.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` with ``{"image": path, "label": path}`` items.
    """
    root = Path(dataset_dir)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    splits = {"training": (seed, num_train), "validation": (seed + 1000, num_val), "test": (seed + 2000, num_test)}
    out: dict[str, list[dict[str, str]]] = {}
    for split, (start, n) in splits.items():
        items = []
        for s in range(start, start + n):
            name = f"phantom_{s:04d}_{'x'.join(str(int(v)) for v in shape)}.nii.gz"
            image_path, label_path = root / "imagesTr" / name, root / "labelsTr" / name
            if not (image_path.exists() and label_path.exists()):
                image, label = make_phantom(s, shape)
                affine = np.eye(4)
                # write to a temporary name first: an interrupted run never leaves a truncated volume behind, and
                # concurrent writers (one per distributed rank) each rename their own identical file
                for arr, path in ((image[0], image_path), (label[0], label_path)):
                    tmp = path.with_name(f"tmp{os.getpid()}_{path.name}")
                    nib.save(nib.Nifti1Image(arr, affine), tmp)
                    tmp.replace(path)
            items.append({"image": str(image_path), "label": str(label_path)})
        out[split] = items
    (root / "datalist.json").write_text(json.dumps(out, indent=4))
    return out


def check_datalist(
    items: Sequence[dict],
    num_classes: int,
    image_key: str = "image",
    label_key: str = "label",
    atol: float = 1e-3,
    label_values: Sequence[int] | None = None,
    name: str = "datalist",
) -> int:
    """Check every case before training: files exist and load, image and label agree in shape and affine,
    label values are integers in ``[0, num_classes)``, or among ``label_values`` when the files use a raw
    labelling that a transform maps later (BraTS 0/1/2/4). Reads headers and labels only once per case.

    Args:
        name: what ``items`` are, for the messages (e.g. ``"validation datalist"``).

    Returns:
        the number of cases checked.

    Raises:
        ValueError: on the first bad case, naming it and the problem.
    """
    if not items:
        raise ValueError(
            f"the {name} is empty: give at least one case (in MONAI Label, label more images or change val_split)."
        )
    for i, item in enumerate(items):
        case = item.get(label_key) or item.get(image_key) or f"item {i}"
        paths = {}
        for key in (image_key, label_key):
            value = item.get(key)
            if value is None:
                raise ValueError(f"case {i} ({case}): no '{key}' entry.")
            for p in [value] if isinstance(value, (str, Path)) else list(value):
                if not Path(p).is_file():
                    raise ValueError(f"case {i} ({case}): {key} file not found: {p}")
            paths[key] = [value] if isinstance(value, (str, Path)) else list(value)
        try:
            imgs = [nib.load(str(p)) for p in paths[image_key]]
            lab = nib.load(str(paths[label_key][0]))
        except Exception as e:  # nibabel raises several types for corrupt files
            raise ValueError(f"case {i} ({case}): cannot read: {e}") from e
        for img, p in zip(imgs, paths[image_key]):
            if tuple(img.shape[:3]) != tuple(lab.shape[:3]):
                raise ValueError(f"case {i} ({case}): image {p} shape {img.shape} != label shape {lab.shape}.")
            if not np.allclose(img.affine, lab.affine, atol=atol):
                raise ValueError(f"case {i} ({case}): image {p} and label affines differ:\n{img.affine}\n{lab.affine}")
        values = np.unique(np.asanyarray(lab.dataobj))
        if label_values is None:
            bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
            allowed = f"the classes [0, {num_classes})"
        else:
            bad = values[~np.isin(values, np.asarray(label_values))]
            allowed = f"the label values {list(label_values)}"
        if bad.size:
            raise ValueError(f"case {i} ({case}): label values {bad[:8].tolist()} outside {allowed}.")
    return len(items)


def load_datalist(datalist_file: str | Path, dataset_dir: str | Path) -> dict[str, list[dict]]:
    """Read a split file (``{"training": [{"image": rel, "label": rel}, ...], "validation": ..., "test": ...}``
    with paths relative to the dataset root, MSD style ``./imagesTr/x.nii.gz``) and return absolute paths.

    Each split (every key holding a list) goes through ``monai.data.load_decathlon_datalist`` with the absolute
    ``dataset_dir`` as base: ``image`` and ``label`` (a path or a list of paths, one per channel) are joined to it,
    other entries only when they name an existing file there, and a ``test`` list of bare paths becomes
    ``[{"image": path}]``. Other keys (MSD metadata such as ``"name"``) are left out.

    Raises:
        ValueError: when the file or ``dataset_dir`` is missing, or the file is not a JSON object, naming them.
    """
    datalist_file, root = Path(datalist_file), Path(dataset_dir)
    if not datalist_file.is_file():
        raise ValueError(f"datalist file not found: {datalist_file}")
    if not root.is_dir():
        raise ValueError(f"dataset_dir not found: {root} (set dataset_dir to your copy of the data)")
    try:
        splits = json.loads(datalist_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist file {datalist_file} is not valid JSON: {e}") from e
    if not isinstance(splits, dict):
        raise ValueError(
            f"datalist file {datalist_file} must hold a JSON object of splits, got {type(splits).__name__}."
        )
    base = root.resolve()
    # an empty split is returned as is: load_decathlon_datalist reads the first item of a "test" list
    return {
        split: load_decathlon_datalist(datalist_file, True, split, base) if items else []
        for split, items in splits.items()
        if isinstance(items, list)
    }
