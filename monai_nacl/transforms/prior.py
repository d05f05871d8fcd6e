"""Neighbour-prior transforms: τ from a label volume, computed once on the full volume before cropping."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

from monai_nacl.input_checks import check_ignore_index, check_label_values, check_num_classes
from monai_nacl.neighbor_prior import (
    KERNELS,
    PADDINGS,
    check_kernel_size,
    check_sigma,
    ensure_kernel_size,
    ensure_sigma,
    kernel_size_from_spacing,
    neighbor_prior,
    sigma_from_spacing,
)

__all__ = ["NeighborPrior", "NeighborPriord"]


class NeighborPrior(Transform):
    """Turn a label map ``1,*spatial`` into the NACL neighbour prior τ ``C,*spatial``.

    Run it on the full volume, before random cropping, so patch edges see their true neighbours; then crop
    and flip τ together with the image and label. The loss reads τ instead of recomputing it.

    Args:
        num_classes: number of classes ``C``.
        kernel: ``"mean"`` or ``"gaussian"`` (SVLS kernel), as in :class:`monai_nacl.losses.NACLLoss`.
        kernel_size: odd window size in voxels, one or per axis. Ignored when ``neighborhood_mm`` is given.
        sigma: Gaussian sigma (voxels; millimetres when ``neighborhood_mm`` is given).
        padding: ``"replicate"`` (default, τ sums to 1 at borders), ``"zeros"`` or ``"background"``.
        ignore_index: label that is not a neighbour (τ renormalised over valid neighbours).
        neighborhood_mm: spacing-aware option: the window's edge in mm (one or per axis); each axis gets the
            odd voxel count closest to it from the label's ``pixdim`` (e.g. 4.5 mm at 1.5×1.5×10 mm → 3×3×1).
        dtype: ``torch.float32`` or ``torch.float16`` (half the memory in a cache).

    Raises:
        ValueError: bad options, at construction (``kernel_size`` not odd positive integers, e.g. ``3.0``;
            ``sigma`` or ``neighborhood_mm`` not positive finite numbers; ``ignore_index`` not an integer...); a
            label that is not ``1,*spatial``, holds non-integer values (e.g. ``1.9``: never floored), NaN/Inf or
            values outside ``[0, C)`` other than ``ignore_index``, or lacks spacing when ``neighborhood_mm`` is used
            on a plain tensor.

    Example:
        >>> prior = NeighborPrior(num_classes=3)
        >>> tau = prior(torch.randint(0, 3, (1, 8, 8, 8)))
        >>> tau.shape
        torch.Size([3, 8, 8, 8])
    """

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __init__(
        self,
        num_classes: int,
        kernel: str = "mean",
        kernel_size: int | Sequence[int] = 3,
        sigma: float | Sequence[float] = 1.0,
        padding: str = "replicate",
        ignore_index: int | None = None,
        neighborhood_mm: float | Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        num_classes = check_num_classes(num_classes)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")
        if dtype not in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype}.")
        self.num_classes = int(num_classes)
        self.kernel = kernel
        self.kernel_size = check_kernel_size(kernel_size)
        self.sigma = check_sigma(sigma)
        self.padding = padding
        self.ignore_index = check_ignore_index(ignore_index)
        self.neighborhood_mm = None if neighborhood_mm is None else check_sigma(neighborhood_mm, "neighborhood_mm")
        self.dtype = dtype

    def kernel_for(self, label: torch.Tensor) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Per-axis kernel size and sigma (voxels) used for this label."""
        spatial_dims = label.ndim - 1
        if self.neighborhood_mm is None:
            return ensure_kernel_size(self.kernel_size, spatial_dims), ensure_sigma(self.sigma, spatial_dims)
        if not isinstance(label, MetaTensor):
            raise ValueError("neighborhood_mm needs the label's spacing: pass a MetaTensor (e.g. from LoadImaged).")
        spacing = [float(s) for s in label.pixdim[:spatial_dims]]
        return kernel_size_from_spacing(self.neighborhood_mm, spacing), sigma_from_spacing(self.sigma, spacing)

    def __call__(self, label: torch.Tensor | np.ndarray) -> torch.Tensor:
        """
        Args:
            label: integer-valued label map ``1,*spatial`` (tensor, MetaTensor or array; any device).

        Returns:
            τ ``C,*spatial``; a MetaTensor with the label's metadata when the label is one.
        """
        lab = label if isinstance(label, MetaTensor) else convert_to_tensor(label, track_meta=False)
        if lab.ndim not in (3, 4) or lab.shape[0] != 1:
            raise ValueError(f"label must have shape 1,*spatial (2D or 3D), got {tuple(lab.shape)}.")
        sizes, sigma = self.kernel_for(lab)
        plain = lab.as_tensor() if isinstance(lab, MetaTensor) else lab
        plain = check_label_values(plain, self.num_classes, self.ignore_index, name="label")
        tau = neighbor_prior(
            plain[None], self.num_classes, self.kernel, sizes, sigma, self.padding, self.ignore_index, self.dtype
        )[0]
        if isinstance(lab, MetaTensor):
            return MetaTensor(tau, meta=lab.meta, applied_operations=list(lab.applied_operations))
        return tau


class NeighborPriord(MapTransform):
    """Dictionary version of :class:`NeighborPrior`: writes τ of ``keys`` under ``prior_key``.

    List the prior key together with the image and label in later spatial transforms
    (``RandCropByPosNegLabeld``, ``RandSpatialCropd``, ``RandFlipd``...) so all three stay aligned.

    Args:
        keys: label key(s).
        num_classes, kernel, kernel_size, sigma, padding, ignore_index, neighborhood_mm, dtype: see
            :class:`NeighborPrior`.
        prior_key: output key, or one per key in ``keys``.
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> t = NeighborPriord("label", num_classes=3, prior_key="prior")
        >>> out = t({"label": torch.randint(0, 3, (1, 8, 8, 8))})
        >>> out["prior"].shape
        torch.Size([3, 8, 8, 8])
    """

    backend = NeighborPrior.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        kernel: str = "mean",
        kernel_size: int | Sequence[int] = 3,
        sigma: float | Sequence[float] = 1.0,
        padding: str = "replicate",
        ignore_index: int | None = None,
        neighborhood_mm: float | Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
        prior_key: str | Sequence[str] = "prior",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prior = NeighborPrior(
            num_classes, kernel, kernel_size, sigma, padding, ignore_index, neighborhood_mm, dtype
        )
        self.prior_keys = [prior_key] if isinstance(prior_key, str) else list(prior_key)
        if len(self.prior_keys) != len(self.keys):
            raise ValueError(f"prior_key {self.prior_keys} must have one entry per key in {list(self.keys)}.")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.prior_keys):
            try:
                d[out_key] = self.prior(d[key])
            except ValueError as e:
                raise ValueError(f"NeighborPriord on key {key!r}: {e}") from e
        return d
