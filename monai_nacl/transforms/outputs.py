"""What inference hands out: a per-case summary of each structure, and the output a client asked for."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform
from monai.utils import look_up_option

__all__ = ["OUTPUT_KINDS", "StructureSummaryd", "SelectOutputd"]

logger = logging.getLogger(__name__)
OUTPUT_KINDS = ("segmentation", "probabilities", "entropy", "outer_mask", "inner_mask")


def _stem(path: str) -> str:
    """The file name without its image suffix, as ``SaveImaged`` names outputs (``a.b.nii.gz`` -> ``a.b``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _spacing(x: torch.Tensor) -> list[float]:
    if isinstance(x, MetaTensor):
        return [float(s) for s in affine_to_spacing(x.affine, r=x.ndim - 1)]
    return [1.0] * (x.ndim - 1)


class StructureSummaryd(MapTransform):
    """Per case and structure (every class but background): volume in mL of the segmentation, and the mean
    entropy and mean maximum probability of its voxels; stored as ``data[output_key]["structures"]`` (MONAI
    Label returns ``data["result"]`` in its response) and, with ``output_dir``, written to
    ``<case>_summary.json``.

    Args:
        keys: the segmentation (class indices, ``1,*spatial``).
        prob_key: the probabilities (``C,*spatial``); their affine gives the voxel size.
        entropy_key: the voxel entropy (``1,*spatial``).
        class_names: names of the classes, background first.
        label_values: the value each class has in the segmentation (default ``0..C-1``).
        output_key: where the summary goes.
        output_dir: folder of the per-case JSON (``None``: not written).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str,
        entropy_key: str,
        class_names: Sequence[str],
        label_values: Sequence[int] | None = None,
        output_key: str = "result",
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("StructureSummaryd takes exactly one segmentation key.")
        self.class_names = list(class_names)
        self.label_values = list(range(len(self.class_names))) if label_values is None else list(label_values)
        if len(self.label_values) != len(self.class_names):
            raise ValueError(f"label_values has {len(self.label_values)} entries, class_names {len(self.class_names)}.")
        self.prob_key, self.entropy_key, self.output_key = prob_key, entropy_key, output_key
        self.output_dir = None if output_dir is None else Path(output_dir)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        seg = torch.as_tensor(d[self.keys[0]])
        prob = d[self.prob_key]
        entropy = torch.as_tensor(d[self.entropy_key]).float()
        if prob.shape[0] != len(self.class_names):
            raise ValueError(f"{self.prob_key} has {prob.shape[0]} channels, class_names {len(self.class_names)}.")
        spacing = _spacing(prob)
        voxel_ml = math.prod(spacing) / 1000.0
        top = torch.as_tensor(prob).float().max(0, keepdim=True).values
        structures = {}
        for name, value in zip(self.class_names[1:], self.label_values[1:]):
            inside = seg == value
            n = int(inside.sum())
            structures[name] = {
                "voxels": n,
                "volume_ml": n * voxel_ml,
                "mean_entropy": float(entropy[inside].mean()) if n else None,
                "mean_max_probability": float(top[inside].mean()) if n else None,
            }
        source = prob.meta.get("filename_or_obj", "") if isinstance(prob, MetaTensor) else ""
        summary = {"image": str(source), "voxel_spacing_mm": spacing, "structures": structures}
        result = dict(d.get(self.output_key) or {})
        result.update(summary)
        d[self.output_key] = result
        if self.output_dir is not None:
            stem = _stem(str(source)) if source else "case"
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / f"{stem}_summary.json"
            path.write_text(json.dumps(summary, indent=4) + "\n")
            logger.info("wrote %s", path)
        return d


class SelectOutputd(MapTransform):
    """Replace ``keys`` (the output a client receives, e.g. MONAI Label's ``pred``) by the output asked for:
    ``"segmentation"`` (kept, as uint8), ``"probabilities"`` (``prob_key``, float32), ``"entropy"``
    (``entropy_key``, float32), or the conformal ``"outer_mask"`` / ``"inner_mask"`` of
    :class:`~monai_nacl.transforms.ConformalMasksd` as one uint8 label map (class ``c`` where structure ``c``'s
    mask holds; where two structures' masks overlap, the more probable one). A list (as MONAI Label passes an
    option's choices) selects its first entry.

    Args:
        keys: the output key.
        output_kind: one of :data:`OUTPUT_KINDS`.
        prob_key: key of the probabilities.
        entropy_key: key of the voxel entropy.
        outer_key: key of the outer masks (one channel per structure).
        inner_key: key of the inner masks.
        mask_classes: the class index of each mask channel (default ``1 .. S``, as ``ConformalMasksd`` writes them).
        label_values: the value written for class ``c`` is ``label_values[c]`` (e.g. BraTS ``[0, 1, 2, 4]``, as the
            segmentation is mapped back to raw labels); default the class index.

    Raises:
        ValueError: ``output_kind`` is not one of :data:`OUTPUT_KINDS`; at call time, a mask output asked for where
            no conformal masks were computed (no record fitted for the served weights).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_kind: str | Sequence[str] = "segmentation",
        prob_key: str = "prob",
        entropy_key: str = "entropy",
        outer_key: str = "conformal_outer",
        inner_key: str = "conformal_inner",
        mask_classes: Sequence[int] | None = None,
        label_values: Sequence[int] | None = None,
    ) -> None:
        super().__init__(keys)
        if not isinstance(output_kind, str) and isinstance(output_kind, Sequence) and output_kind:
            output_kind = output_kind[0]
        self.output_kind = look_up_option(output_kind, OUTPUT_KINDS)
        self.prob_key, self.entropy_key = prob_key, entropy_key
        self.outer_key, self.inner_key = outer_key, inner_key
        self.mask_classes = None if mask_classes is None else [int(c) for c in mask_classes]
        self.label_values = None if label_values is None else [int(v) for v in label_values]
        if self.label_values is not None and not all(0 <= v < 256 for v in self.label_values):
            raise ValueError(f"label_values must fit uint8 labels, got {self.label_values}.")

    def _mask_labels(self, d: Mapping) -> torch.Tensor:
        key = self.outer_key if self.output_kind == "outer_mask" else self.inner_key
        if key not in d:
            raise ValueError(
                f"output_kind {self.output_kind!r}: no {key!r} in this output, i.e. no conformal record fitted for "
                "the served weights (run the bundle's calibrate.json, which fits one)."
            )
        masks = torch.as_tensor(d[key]).bool()
        prob = torch.as_tensor(d[self.prob_key]).float()
        classes = self.mask_classes or list(range(1, masks.shape[0] + 1))
        if len(classes) != masks.shape[0]:
            raise ValueError(f"mask_classes {classes} do not match {masks.shape[0]} mask channels in {key!r}.")
        # per voxel, the most probable structure among those whose mask holds it; 0 where none does
        if self.label_values is not None and max(classes) >= len(self.label_values):
            raise ValueError(f"label_values {self.label_values} have no value for mask classes {classes}.")
        values = [self.label_values[c] for c in classes] if self.label_values is not None else classes
        score = prob[classes].to(masks.device).masked_fill(~masks, -1.0)
        best, idx = score.max(0)
        labels = torch.tensor(values, dtype=torch.uint8, device=idx.device)[idx]
        return torch.where(best >= 0, labels, torch.zeros_like(labels))[None]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.output_kind == "segmentation":
                d[key] = d[key].to(torch.uint8) if isinstance(d[key], torch.Tensor) else np.asarray(d[key], np.uint8)
            elif self.output_kind in ("outer_mask", "inner_mask"):
                labels = self._mask_labels(d)
                # keep the segmentation's metadata (affine, file name) for the writer
                d[key] = d[key].clone().to(torch.uint8).copy_(labels) if isinstance(d[key], torch.Tensor) else labels
            else:
                source = self.prob_key if self.output_kind == "probabilities" else self.entropy_key
                d[key] = d[source].float() if isinstance(d[source], torch.Tensor) else np.float32(d[source])
            result = dict(d.get("result") or {})
            result["output_kind"] = self.output_kind
            d["result"] = result
        return d
