"""Datalist builders for the public datasets of the NACL paper, reading each dataset's own file layout.

Each builder returns the labelled cases as ``{"image": path or [paths, one per channel], "label": path,
"case": id, "group": patient}``; :func:`build_datalist` splits them into training / validation / test with a
seeded shuffle of patients (``group``), so the frames of one patient never straddle two splits.
The layouts are those of the public releases as documented by their organisers; the assumptions are listed
in :data:`LAYOUTS` and in each bundle's model card.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["LAYOUTS", "build_datalist", "find_cases", "inference_datalist"]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ValueError(f"{what} not found: {path}")
    return path


def _acdc(root: Path) -> list[dict]:
    """ACDC: ``training/patientNNN/patientNNN_frameNN.nii.gz`` + ``..._gt.nii.gz`` (ED and ES frames)."""
    base = root / "training" if (root / "training").is_dir() else root
    cases = []
    for gt in sorted(base.glob("patient*/patient*_frame[0-9][0-9]_gt.nii.gz")):
        image = gt.with_name(gt.name.replace("_gt.nii.gz", ".nii.gz"))
        cases.append({"image": str(_need(image, "ACDC frame")), "label": str(gt), "case": gt.name[:-10]})
        cases[-1]["group"] = gt.parent.name
    return cases


def _flare(root: Path) -> list[dict]:
    """FLARE21: ``TrainingImg/train_NNN_0000.nii.gz`` + ``TrainingMask/train_NNN.nii.gz``; nnU-Net-style
    ``imagesTr``/``labelsTr`` is accepted as well."""
    images, labels = ("TrainingImg", "TrainingMask") if (root / "TrainingMask").is_dir() else ("imagesTr", "labelsTr")
    cases = []
    for label in sorted((root / labels).glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        image = _need(root / images / f"{case}_0000.nii.gz", "FLARE image")
        cases.append({"image": str(image), "label": str(label), "case": case, "group": case})
    return cases


BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")


def _brats(root: Path) -> list[dict]:
    """BraTS 2019: ``{HGG,LGG}/BraTS19_<inst>_<n>_1/BraTS19_..._{flair,t1,t1ce,t2,seg}.nii.gz``."""
    base = root / "MICCAI_BraTS_2019_Data_Training" if (root / "MICCAI_BraTS_2019_Data_Training").is_dir() else root
    cases = []
    for seg in sorted(base.glob("[HL]GG/*/*_seg.nii.gz")):
        case = seg.parent.name
        images = [str(_need(seg.parent / f"{case}_{m}.nii.gz", "BraTS modality")) for m in BRATS_MODALITIES]
        cases.append({"image": images, "label": str(seg), "case": case, "group": case})
    return cases


def _msd(root: Path) -> list[dict]:
    """Medical Segmentation Decathlon (e.g. Task05_Prostate): the ``training`` list of ``dataset.json``."""
    meta = json.loads(_need(root / "dataset.json", "MSD dataset.json").read_text())
    cases = []
    for item in meta["training"]:
        image, label = (root / item["image"]).resolve(), (root / item["label"]).resolve()
        case = Path(item["label"]).name[: -len(".nii.gz")]
        cases.append({"image": str(_need(image, "MSD image")), "label": str(_need(label, "MSD label")), "case": case})
        cases[-1]["group"] = case
    return cases


def _kits19(root: Path) -> list[dict]:
    """KiTS19: ``data/case_NNNNN/imaging.nii.gz`` + ``segmentation.nii.gz`` (cases without a segmentation,
    the challenge test set, are left out)."""
    base = root / "data" if (root / "data").is_dir() else root
    cases = []
    for seg in sorted(base.glob("case_[0-9][0-9][0-9][0-9][0-9]/segmentation.nii.gz")):
        image = _need(seg.with_name("imaging.nii.gz"), "KiTS19 imaging")
        cases.append({"image": str(image), "label": str(seg), "case": seg.parent.name, "group": seg.parent.name})
    return cases


MRBRAINS_MODALITIES = ("FLAIR", "reg_T1", "reg_IR")


def _mrbrains18(root: Path) -> list[dict]:
    """MRBrainS18: ``training/<id>/pre/{FLAIR,reg_T1,reg_IR}.nii.gz`` + ``training/<id>/segm.nii.gz``."""
    base = root / "training" if (root / "training").is_dir() else root
    cases = []
    for seg in sorted(base.glob("*/segm.nii.gz")):
        images = [str(_need(seg.parent / "pre" / f"{m}.nii.gz", "MRBrainS18 image")) for m in MRBRAINS_MODALITIES]
        cases.append({"image": images, "label": str(seg), "case": seg.parent.name, "group": seg.parent.name})
    return cases


LAYOUTS: dict[str, Callable[[Path], list[dict]]] = {
    "acdc": _acdc,
    "flare21": _flare,
    "brats19": _brats,
    "msd": _msd,
    "kits19": _kits19,
    "mrbrains18": _mrbrains18,
}


def find_cases(dataset: str, dataset_dir: str | Path) -> list[dict]:
    """All labelled cases of ``dataset`` (a key of :data:`LAYOUTS`) under ``dataset_dir``.

    Raises:
        ValueError: unknown dataset, missing folder, a case missing one of its files, or no case at all.
    """
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(LAYOUTS)}.")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ValueError(f"dataset_dir not found: {root} (set dataset_dir to your copy of {dataset})")
    cases = LAYOUTS[dataset](root)
    if not cases:
        raise ValueError(f"no {dataset} cases found under {root}: {(LAYOUTS[dataset].__doc__ or '').strip()}")
    return cases


def build_datalist(
    dataset: str,
    dataset_dir: str | Path,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 2026,
    limit: int | None = None,
) -> dict[str, list[dict]]:
    """Seeded patient-level split of :func:`find_cases` into ``training`` / ``validation`` / ``test``.

    Args:
        dataset: layout name, one of :data:`LAYOUTS`.
        dataset_dir: root of the user's copy of the dataset.
        fractions: shares of patients for training, validation and test (normalised; each split gets at least
            one patient when there are three or more).
        seed: shuffle seed; the same files always give the same split.
        limit: keep only the first ``limit`` cases of each split (quick runs).

    Example:
        >>> splits = build_datalist("kits19", "/data/kits19")  # doctest: +SKIP
        >>> sorted(splits)
        ['test', 'training', 'validation']
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative shares, got {fractions}.")
    cases = find_cases(dataset, dataset_dir)
    groups = sorted({c["group"] for c in cases}, key=_natural)
    random.Random(seed).shuffle(groups)
    total = sum(fractions)
    n_val = max(1, round(len(groups) * fractions[1] / total)) if len(groups) >= 3 else 0
    n_test = max(1, round(len(groups) * fractions[2] / total)) if len(groups) >= 3 else 0
    split_of = {g: "validation" for g in groups[:n_val]}
    split_of.update({g: "test" for g in groups[n_val : n_val + n_test]})
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for case in cases:
        out[split_of.get(case["group"], "training")].append(case)
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out


def inference_datalist(dataset: str, dataset_dir: str | Path, split: str = "test", **kwargs) -> list[dict]:
    """The images of one split of :func:`build_datalist` as ``[{"image": ...}]`` (labels dropped), the default
    input of the bundles' ``inference.json``."""
    splits = build_datalist(dataset, dataset_dir, **kwargs)
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}.")
    return [{"image": item["image"]} for item in splits[split]]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
