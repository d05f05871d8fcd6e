"""Inference outputs from a conformal record: risk-controlled inner/outer masks and structure-volume intervals."""

from __future__ import annotations

import csv
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_nacl.conformal.methods import ConformalRiskControl, ConformalVolumeIntervals
from monai_nacl.conformal.record import load_conformal, read_conformal_record, warn_if_conformal_stale
from monai_nacl.handlers.conformal import case_spacing
from monai_nacl.temperature.record import _finite

__all__ = ["ConformalMasksd", "StructureVolumeIntervalsd"]

logger = logging.getLogger(__name__)


class _FromRecord(MapTransform):
    """Load one fit of a conformal record beside ``weights_path`` and check it belongs to those weights."""

    kind = ""

    def __init__(
        self,
        keys: KeysCollection,
        weights_path: str | Path,
        alpha: float | None,
        structures: Sequence[int] | None,
        output_key: str,
        strict: bool,
        allow_missing_keys: bool,
        missing_ok: bool = False,
        inferer: Any = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"{type(self).__name__} takes exactly one probability key, got {list(self.keys)}.")
        self.weights_path = Path(weights_path)
        self.output_key = output_key
        record = read_conformal_record(self.weights_path)
        self.fit = None
        if record is None and missing_ok:
            # e.g. a model just fine-tuned: saving new weights removes the record of the old ones
            logger.warning(
                "%s: no conformal record beside it (%s.conformal.json); %s adds no conformal outputs until "
                "calibrate.json fits one for these weights.",
                self.weights_path,
                self.weights_path.stem,
                type(self).__name__,
            )
            return
        if record is None:
            raise FileNotFoundError(
                f"{self.weights_path}: no conformal record beside it ({self.weights_path.stem}.conformal.json); fit "
                "it first (the bundle's calibrate.json), or remove this transform from inference."
            )
        self.problems = warn_if_conformal_stale(self.weights_path, strict=strict, inferer=inferer)
        self.fit = load_conformal(record, self.kind, alpha)
        C = self.fit.num_classes
        self.class_names = list(self.fit.class_names or [str(c) for c in range(C)])
        if structures is None:
            structures = list(range(1, C))
        self.structures = [int(c) for c in structures]
        bad = [c for c in self.structures if not 0 <= c < C]
        if bad or not self.structures:
            raise ValueError(f"structures must be class indices in [0, {C}), got {list(structures)}.")

    def _probs(self, d: Mapping) -> torch.Tensor:
        key = self.keys[0]
        prob = d[key]
        if not isinstance(prob, torch.Tensor) or prob.ndim != self.fit.spatial_dims + 1:
            shape = tuple(prob.shape) if hasattr(prob, "shape") else type(prob).__name__
            raise ValueError(
                f"{key} must be C,*spatial probabilities ({self.fit.spatial_dims} spatial dims), got {shape}."
            )
        if prob.shape[0] != self.fit.num_classes:
            raise ValueError(
                f"{key} has {prob.shape[0]} channels, but the conformal record of {self.weights_path} was fitted for "
                f"{self.fit.num_classes} classes."
            )
        return prob

    def _result(self, d: dict) -> dict:
        result = dict(d.get(self.output_key) or {})
        d[self.output_key] = result
        return result


class ConformalMasksd(_FromRecord):
    """Risk-controlled inner and outer masks of each structure, from the ``risk_control`` fit of the conformal record
    beside the weights (``models/model.conformal.json``).

    ``d[inner_key]`` and ``d[outer_key]`` are ``uint8`` images with one channel per structure (in ``structures``
    order) and the probabilities' metadata, ready for ``SaveImaged``. For a new case like the calibration cases, the
    outer mask misses on average at most ``alpha`` of the structure's true voxels, and the inner mask's voxels outside
    the structure amount on average to at most ``alpha`` of its true volume (docs/conformal.md). Per structure,
    ``d[output_key]["conformal_masks"]`` gets the thresholds and the voxel counts and volumes (mL) of both masks.

    Args:
        keys: the calibrated probabilities ``C,*spatial`` (softmax of the temperature-scaled network; in the space
            the record was fitted in, or resampled from it only by orientation changes).
        weights_path: the weights whose record is read, e.g. ``models/model.pt``.
        alpha: which fit of the record (``None``: its only ``risk_control`` fit).
        inner_key: output key of the inner masks.
        outer_key: output key of the outer masks.
        structures: class indices to output (default: every class but 0).
        output_key: where the per-structure summary goes (MONAI Label returns ``result``).
        strict: a record fitted for other weights, another temperature or another inferer raises instead of warning.
        allow_missing_keys: skip a case without ``keys``.
        missing_ok: without a record beside the weights (never fitted, or removed when new weights were saved),
            log a warning once and pass every case through unchanged instead of raising.
        inferer: the inferer the probabilities come from (the bundles pass ``@inferer``): a record fitted on another
            one's probabilities (e.g. without mirror test-time augmentation) is stale.

    Raises:
        FileNotFoundError: no weights file, or (unless ``missing_ok``) no record beside it.
        ValueError: no ``risk_control`` fit at ``alpha``; bad ``structures``; with ``strict``, a stale record; at call
            time, probabilities of another class count or shape.

    Example:
        >>> masks = ConformalMasksd("prob", "models/model.pt", alpha=0.1)
        >>> d = masks({"prob": prob})  # d["conformal_inner"], d["conformal_outer"]: uint8 S,*spatial
    """

    kind = "risk_control"

    def __init__(
        self,
        keys: KeysCollection,
        weights_path: str | Path,
        alpha: float | None = None,
        inner_key: str = "conformal_inner",
        outer_key: str = "conformal_outer",
        structures: Sequence[int] | None = None,
        output_key: str = "result",
        strict: bool = False,
        allow_missing_keys: bool = False,
        missing_ok: bool = False,
        inferer: Any = None,
    ) -> None:
        super().__init__(
            keys, weights_path, alpha, structures, output_key, strict, allow_missing_keys, missing_ok, inferer
        )
        self.inner_key, self.outer_key = inner_key, outer_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.fit is None or (self.keys[0] not in d and self.allow_missing_keys):
            return d
        prob = self._probs(d)
        fit: ConformalRiskControl = self.fit
        inner, outer = fit.predict(prob.as_tensor() if isinstance(prob, MetaTensor) else prob)
        spacing = case_spacing(prob, fit.spatial_dims)
        voxel_ml = float(torch.tensor(spacing or [1.0] * fit.spatial_dims).prod()) / 1000.0
        summary = {}
        for c in self.structures:
            n_in, n_out = int(inner[c].sum()), int(outer[c].sum())
            summary[self.class_names[c]] = {
                "inner_threshold": float(fit.inner_threshold[c]),
                "outer_threshold": float(fit.outer_threshold[c]),
                "inner_voxels": n_in,
                "outer_voxels": n_out,
                "inner_ml": n_in * voxel_ml,
                "outer_ml": n_out * voxel_ml,
            }
        for key, mask in ((self.inner_key, inner), (self.outer_key, outer)):
            out = mask[self.structures].to(torch.uint8)
            d[key] = MetaTensor(out, meta=dict(prob.meta)) if isinstance(prob, MetaTensor) else out  # meta: affine too
        # strict JSON for the client (MONAI Label's JSON response refuses inf): an infinite threshold is null
        self._result(d)["conformal_masks"] = _finite({"alpha": fit.alpha, "n": fit.n, "structures": summary})
        return d


class StructureVolumeIntervalsd(_FromRecord):
    """Per structure, the expected volume and its conformal interval in mL, from the ``volume_intervals`` fit of the
    conformal record beside the weights; the voxel size comes from the probabilities' affine.

    For a new case like the calibration cases, the interval holds the structure's true volume with probability at
    least ``1 - alpha`` (marginally, per structure; docs/conformal.md). The values go to
    ``d[output_key]["volume_intervals"]`` and, with ``output_dir``, one row per case and structure to
    ``output_dir/filename`` (CSV; the first case of a run rewrites the file, later cases append): ``image``,
    ``structure``, ``alpha``, ``expected_volume_ml``, ``low_ml``, ``high_ml`` (``inf`` when too few calibration
    cases), and ``segmentation_volume_ml`` with ``seg_key``.

    Args:
        keys: the calibrated probabilities ``C,*spatial``.
        weights_path: the weights whose record is read, e.g. ``models/model.pt``.
        alpha: which fit of the record (``None``: its only ``volume_intervals`` fit).
        seg_key: optional segmentation (class indices ``1,*spatial``) whose structure volumes are added.
        structures: class indices to report (default: every class but 0).
        output_key: where the rows go in the data (MONAI Label returns ``result``).
        output_dir: folder of the CSV (``None``: not written).
        filename: CSV file name.
        strict: a record fitted for other weights, another temperature or another inferer raises instead of warning.
        allow_missing_keys: skip a case without ``keys``.
        missing_ok: without a record beside the weights (never fitted, or removed when new weights were saved),
            log a warning once and pass every case through unchanged instead of raising.
        inferer: the inferer the probabilities come from (the bundles pass ``@inferer``): a record fitted on another
            one's probabilities (e.g. without mirror test-time augmentation) is stale.

    Raises:
        FileNotFoundError: no weights file, or (unless ``missing_ok``) no record beside it.
        ValueError: no ``volume_intervals`` fit at ``alpha``; bad ``structures``; with ``strict``, a stale record; at
            call time, probabilities of another class count or shape.

    Example:
        >>> intervals = StructureVolumeIntervalsd("prob", "models/model.pt", alpha=0.1, output_dir="eval")
        >>> d = intervals({"prob": prob})  # d["result"]["volume_intervals"]["anterior"]["low_ml"], ...
    """

    kind = "volume_intervals"
    columns = ("image", "structure", "alpha", "expected_volume_ml", "low_ml", "high_ml", "segmentation_volume_ml")

    def __init__(
        self,
        keys: KeysCollection,
        weights_path: str | Path,
        alpha: float | None = None,
        seg_key: str | None = None,
        structures: Sequence[int] | None = None,
        output_key: str = "result",
        output_dir: str | Path | None = None,
        filename: str = "volume_intervals.csv",
        strict: bool = False,
        allow_missing_keys: bool = False,
        missing_ok: bool = False,
        inferer: Any = None,
    ) -> None:
        super().__init__(
            keys, weights_path, alpha, structures, output_key, strict, allow_missing_keys, missing_ok, inferer
        )
        self.seg_key = seg_key
        self.output_dir = None if output_dir is None else Path(output_dir)
        if Path(filename).name != filename or not filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}.")
        self.filename = filename
        self._started = False

    @property
    def csv_path(self) -> Path | None:
        """The CSV written (``None`` without ``output_dir``)."""
        return None if self.output_dir is None else self.output_dir / self.filename

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.fit is None or (self.keys[0] not in d and self.allow_missing_keys):
            return d
        prob = self._probs(d)
        fit: ConformalVolumeIntervals = self.fit
        p = prob.as_tensor() if isinstance(prob, MetaTensor) else prob
        spacing = case_spacing(prob, fit.spatial_dims)
        expected, _ = fit.estimate(p, spacing=spacing)
        low, high = fit.predict(p, spacing=spacing)
        seg = None
        if self.seg_key is not None:
            seg = torch.as_tensor(d[self.seg_key])
            if seg.shape[-fit.spatial_dims :] != p.shape[1:]:
                raise ValueError(f"{self.seg_key} has shape {tuple(seg.shape)}, {self.keys[0]} {tuple(p.shape)}.")
        voxel_ml = float(torch.tensor(spacing or [1.0] * fit.spatial_dims, dtype=torch.float64).prod()) / 1000.0
        source = prob.meta.get("filename_or_obj", "") if isinstance(prob, MetaTensor) else ""
        rows, structures = [], {}
        for c in self.structures:
            name = self.class_names[c]
            entry = {
                "alpha": fit.alpha,
                "expected_volume_ml": float(expected[c]),
                "low_ml": float(low[c]),
                "high_ml": float(high[c]),
            }
            if seg is not None:
                entry["segmentation_volume_ml"] = int((seg == c).sum()) * voxel_ml
            structures[name] = entry
            rows.append({"image": str(source), "structure": name, **entry})
        # strict JSON for the client: an unbounded interval end is null there (the CSV keeps inf)
        self._result(d)["volume_intervals"] = _finite({"alpha": fit.alpha, "n": fit.n, "structures": structures})
        if self.output_dir is not None:
            self._write(rows)
        return d

    def _write(self, rows: list[dict]) -> None:
        path = self.csv_path
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = [c for c in self.columns if c != "segmentation_volume_ml" or self.seg_key is not None]
        with path.open("a" if self._started else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            if not self._started:
                writer.writeheader()
            writer.writerows(rows)
        if not self._started:
            logger.info("writing %s", path)
        self._started = True
