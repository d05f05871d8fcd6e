"""Tiny synthetic cases written in the exact file layout of each dataset of the NACL paper.

They let the dataset bundles be trained, evaluated and served end to end without the real data: same folder
and file names, channels, label values, voxel spacing and (for KiTS19) the same unusual axis order. The
anatomy is a blurred ball cut into touching sectors, one per label value; intensities follow the modality
(Hounsfield units for CT, arbitrary per-case scale for MR).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_nacl.data.layouts import BRATS_MODALITIES, LAYOUTS, MRBRAINS_MODALITIES

__all__ = ["write_fixture"]


def _labels(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], values: Sequence[int]):
    """A ball (radius ~35 % of the smallest physical extent) split into len(values) touching angular sectors."""
    axes = [(np.arange(n) - (n - 1) / 2 + rng.uniform(-1, 1)) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = 0.35 * min(n * s for n, s in zip(shape, spacing))
    inside = (x / radius) ** 2 + (y / radius) ** 2 + (z / (radius * 1.5)) ** 2 <= 1.0
    sector = ((np.arctan2(y, x) + np.pi + rng.uniform(0, 0.5)) / (2 * np.pi) * len(values)).astype(int) % len(values)
    label = np.zeros(tuple(shape), np.uint8)
    label[inside] = np.asarray(values, np.uint8)[sector[inside]]
    return label


def _image(rng: np.random.Generator, label: np.ndarray, modality: str) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    values = np.unique(label)
    foreground = values[values > 0]
    lut = np.zeros(int(values.max()) + 1)  # intensity per label value, looked up for every voxel at once
    if modality == "CT":  # air around a soft-tissue body, organs 40-250 HU
        lut[foreground] = 40.0 + 60.0 * np.arange(len(foreground))
        body = np.zeros(label.shape, bool)
        body[2:-2, 2:-2, :] = True
        image = np.where(body, 0.0, -1000.0) + lut[label]
        noise = 20.0
    else:  # MR: arbitrary scale that differs between cases
        scale = rng.uniform(50, 2000)
        lut[0] = 0.1
        lut[foreground] = 0.3 + 0.6 * np.arange(len(foreground)) / max(1, len(values) - 1)
        image = scale * lut[label]
        noise = 0.05 * scale
    return (gaussian_filter(image, 0.8) + rng.normal(0, noise, label.shape)).astype(np.float32)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _affine(spacing: Sequence[float]) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def write_fixture(dataset: str, root: str | Path, num_cases: int = 5, seed: int = 0) -> Path:
    """Write ``num_cases`` tiny labelled cases of ``dataset`` (a key of ``LAYOUTS``) under ``root``.

    ACDC writes ``ceil(num_cases / 2)`` patients with an ED and an ES frame each. Returns ``root``.

    Example:
        >>> from monai_nacl.data import build_datalist
        >>> root = write_fixture("kits19", "/tmp/kits19_fixture")  # doctest: +SKIP
        >>> len(sum(build_datalist("kits19", root).values(), []))  # doctest: +SKIP
        5
    """
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(LAYOUTS)}.")
    root = Path(root)
    rng = np.random.default_rng(seed)
    if dataset == "acdc":
        spacing, shape = (1.5, 1.5, 10.0), (32, 32, 6)
        for p in range(1, (num_cases + 1) // 2 + 1):
            folder = root / "training" / f"patient{p:03d}"
            frames = (1, 10 + p)
            for f in frames:
                label = _labels(rng, shape, spacing, (1, 2, 3))
                _save(label, _affine(spacing), folder / f"patient{p:03d}_frame{f:02d}_gt.nii.gz")
                _save(_image(rng, label, "MR"), _affine(spacing), folder / f"patient{p:03d}_frame{f:02d}.nii.gz")
            (folder / "Info.cfg").write_text(
                f"ED: {frames[0]}\nES: {frames[1]}\nGroup: NOR\nHeight: 170\nNbFrame: 30\n"
            )
    elif dataset == "flare21":
        spacing, shape = (0.8, 0.8, 2.5), (48, 48, 12)
        for i in range(1, num_cases + 1):
            label = _labels(rng, shape, spacing, (1, 2, 3, 4))
            _save(label, _affine(spacing), root / "TrainingMask" / f"train_{i:03d}.nii.gz")
            _save(_image(rng, label, "CT"), _affine(spacing), root / "TrainingImg" / f"train_{i:03d}_0000.nii.gz")
    elif dataset == "brats19":
        spacing, shape = (1.0, 1.0, 1.0), (24, 24, 20)
        for i in range(num_cases):
            grade = "HGG" if i % 2 == 0 else "LGG"
            case = f"BraTS19_TST_{i}_1"
            folder = root / "MICCAI_BraTS_2019_Data_Training" / grade / case
            label = _labels(rng, shape, spacing, (1, 2, 4))
            _save(label, _affine(spacing), folder / f"{case}_seg.nii.gz")
            for m in BRATS_MODALITIES:
                _save(_image(rng, label, "MR"), _affine(spacing), folder / f"{case}_{m}.nii.gz")
    elif dataset == "msd":  # Task05_Prostate: 4D image (T2, ADC), labels 0 / 1 PZ / 2 TZ
        spacing, shape = (0.6, 0.6, 3.6), (40, 40, 8)
        training = []
        for i in range(num_cases):
            label = _labels(rng, shape, spacing, (1, 2))
            image = np.stack([_image(rng, label, "MR") for _ in range(2)], -1)
            _save(label, _affine(spacing), root / "labelsTr" / f"prostate_{i:02d}.nii.gz")
            _save(image, _affine(spacing), root / "imagesTr" / f"prostate_{i:02d}.nii.gz")
            training.append(
                {"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"}
            )
        meta = {
            "name": "PROSTATE",
            "modality": {"0": "T2", "1": "ADC"},
            "labels": {"0": "background", "1": "PZ", "2": "TZ"},
            "numTraining": num_cases,
            "training": training,
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    elif dataset == "kits19":
        # KiTS19 stores axial slices along the first array axis; the affine maps axis 0 to z (and negates axes).
        spacing, shape = (3.0, 0.8, 0.8), (10, 40, 40)
        affine = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1.0]])
        for i in range(num_cases):
            label = _labels(rng, shape, spacing, (1, 2))
            folder = root / "data" / f"case_{i:05d}"
            _save(label, affine, folder / "segmentation.nii.gz")
            _save(_image(rng, label, "CT"), affine, folder / "imaging.nii.gz")
    else:  # mrbrains18
        spacing, shape = (0.958, 0.958, 3.0), (40, 40, 8)
        ids = ("1", "4", "5", "7", "14", "070", "148")
        for i in range(num_cases):
            folder = root / "training" / (ids[i] if i < len(ids) else str(200 + i))
            label = _labels(rng, shape, spacing, tuple(range(1, 11)))
            _save(label, _affine(spacing), folder / "segm.nii.gz")
            for m in MRBRAINS_MODALITIES:
                _save(_image(rng, label, "MR"), _affine(spacing), folder / "pre" / f"{m}.nii.gz")
    return root
