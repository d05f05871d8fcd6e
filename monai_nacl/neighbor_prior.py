"""Neighbour priors: the soft class proportions around each voxel.

This module is the single home of the kernel and prior computation. The NACL loss (on the fly), the
:class:`~monai_nacl.transforms.NeighborPrior` transforms (full volume, before cropping) and the SVLS
baseline all call :func:`neighbor_prior`, so that "transform then crop" and "loss on the fly" can only
differ at patch edges.

The prior for voxel ``v`` and class ``c`` is

.. math::

    \\tau_c(v) = \\frac{\\sum_u K(u - v)\\,[y(u) = c]}{\\sum_u K(u - v)\\,[y(u) \\neq \\text{ignore}]}

where ``K`` is the (normalised) kernel and ``u`` runs over the window, extended past the volume border
according to ``padding``. Every kernel used here is separable up to a centre term, so filtering costs one
pass per axis instead of one per kernel tap.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_nacl.input_checks import check_number

__all__ = [
    "KERNELS",
    "PADDINGS",
    "check_kernel_size",
    "check_sigma",
    "ensure_kernel_size",
    "ensure_sigma",
    "kernel_size_from_spacing",
    "sigma_from_spacing",
    "dense_kernel",
    "neighbor_prior",
]

KERNELS = ("mean", "gaussian")
PADDINGS = ("replicate", "zeros", "background")

# Internal label codes after canonicalisation: classes keep their index; these never collide with one.
_IGNORED = -1
_EMPTY = -2


def check_kernel_size(kernel_size: object) -> int | tuple[int, ...]:
    """Validate a kernel size without knowing the number of spatial dimensions (e.g. in a constructor).

    Args:
        kernel_size: one odd positive integer, or a sequence of them (one per spatial axis). Python, NumPy and
            0-d torch integers are accepted; ``bool`` and floats (even ``3.0``) are not.

    Returns:
        the size as an ``int``, or a tuple of ``int``.

    Raises:
        ValueError: naming the value and its type when it is not an integer or a sequence of integers, or an entry
            is even or < 1.
    """
    value = kernel_size
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    scalar = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if scalar:
        entries = [value]
    elif isinstance(value, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(value, (str, bytes)):
        entries = [v.item() if isinstance(v, (torch.Tensor, np.ndarray, np.generic)) else v for v in value]
    else:
        entries = None
    if not entries or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in entries):
        raise ValueError(
            f"kernel_size must be an odd positive integer or a sequence of them (one per spatial axis), got "
            f"{kernel_size!r} ({type(kernel_size).__name__})."
        )
    sizes = tuple(int(k) for k in entries)
    if any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_size entries must be positive odd integers, got {sizes if not scalar else sizes[0]}.")
    return sizes[0] if scalar else sizes


def ensure_kernel_size(kernel_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """Return a per-axis kernel size, validating that every entry is a positive odd integer.

    Args:
        kernel_size: one size for all axes or one per spatial axis (see :func:`check_kernel_size`).
        spatial_dims: number of spatial dimensions (2 or 3).

    Raises:
        ValueError: when the length does not match ``spatial_dims``, a size is even or < 1, or the value is not an
            integer or a sequence of integers (the message names it and its type).
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3 (1 is accepted for profiles), got {spatial_dims}.")
    checked = check_kernel_size(kernel_size)
    sizes = (checked,) * spatial_dims if isinstance(checked, int) else checked
    if len(sizes) != spatial_dims:
        raise ValueError(f"kernel_size {tuple(sizes)} has {len(sizes)} entries, expected {spatial_dims}.")
    return sizes


def kernel_size_from_spacing(extent_mm: float | Sequence[float], spacing: Sequence[float]) -> tuple[int, ...]:
    """Convert a neighbourhood extent in millimetres to a per-axis odd voxel extent.

    Each axis gets the odd number of voxels whose total length is closest to ``extent_mm`` (at least 1),
    so that anisotropic volumes get a physically cubic neighbourhood.

    Args:
        extent_mm: edge length of the neighbourhood in mm, one value or one per axis.
        spacing: voxel spacing in mm per spatial axis.

    Returns:
        per-axis kernel sizes.

    Example:
        >>> kernel_size_from_spacing(4.5, (1.5, 1.5, 10.0))
        (3, 3, 1)
    """
    spacing = tuple(float(s) for s in spacing)
    extents = (float(extent_mm),) * len(spacing) if np.isscalar(extent_mm) else tuple(float(e) for e in extent_mm)
    if len(extents) != len(spacing):
        raise ValueError(f"extent_mm {extents} and spacing {spacing} have different lengths.")
    if any(s <= 0 or not math.isfinite(s) for s in spacing) or any(e <= 0 or not math.isfinite(e) for e in extents):
        raise ValueError(f"spacing {spacing} and extent_mm {extents} must be positive and finite.")
    # floor(x + 0.5) rounds half up (Python's round() would send 2.5 to 2).
    return tuple(max(1, 2 * math.floor((e / s - 1) / 2 + 0.5) + 1) for e, s in zip(extents, spacing))


def sigma_from_spacing(sigma_mm: float | Sequence[float], spacing: Sequence[float]) -> tuple[float, ...]:
    """Convert a Gaussian sigma in millimetres to voxels per axis."""
    sig = (float(sigma_mm),) * len(spacing) if np.isscalar(sigma_mm) else tuple(float(s) for s in sigma_mm)
    if len(sig) != len(spacing):
        raise ValueError(f"sigma {sig} and spacing {tuple(spacing)} have different lengths.")
    return tuple(s / float(p) for s, p in zip(sig, spacing))


def check_sigma(sigma: object, name: str = "sigma") -> float | tuple[float, ...]:
    """Validate a Gaussian sigma without knowing the number of spatial dimensions (e.g. in a constructor).

    Returns:
        one positive finite ``float`` or a tuple of them.

    Raises:
        ValueError: a value that is not a real number (strings and ``bool`` included; the message names the value
            and its type), not finite, or <= 0.
    """
    value = sigma.tolist() if isinstance(sigma, (torch.Tensor, np.ndarray)) else sigma
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise ValueError(f"{name} must be a positive number or a sequence of them, got {sigma!r}.")
        return tuple(check_number(s, name, minimum=0.0, exclusive_minimum=True) for s in value)
    return check_number(value, name, minimum=0.0, exclusive_minimum=True)


def ensure_sigma(sigma: float | Sequence[float], spatial_dims: int) -> tuple[float, ...]:
    """One Gaussian sigma per spatial axis: a single value is repeated, a sequence must have ``spatial_dims`` entries.

    Raises:
        ValueError: a value :func:`check_sigma` rejects, or a sequence of another length (the message names
            ``sigma``, the expected count and the values).
    """
    checked = check_sigma(sigma)
    sig = (checked,) * spatial_dims if isinstance(checked, float) else checked
    if len(sig) != spatial_dims:
        raise ValueError(f"sigma must be positive and finite with {spatial_dims} entries, got {sig}.")
    return sig


def _axis_weights(kernel: str, sizes: tuple[int, ...], sigma: tuple[float, ...]) -> list[torch.Tensor] | None:
    """1D factors of the separable part of the kernel (``None`` means a box of ones)."""
    if kernel == "mean":
        return None
    weights = []
    for k, s in zip(sizes, sigma):
        r = torch.arange(k, dtype=torch.float64) - k // 2
        g = torch.exp(-(r**2) / (2 * s * s))
        weights.append(g / g.sum())
    return weights


def _check_options(kernel: str, padding: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")


def dense_kernel(
    kernel: str = "mean",
    kernel_size: int | Sequence[int] = 3,
    sigma: float | Sequence[float] = 1.0,
    spatial_dims: int = 3,
) -> torch.Tensor:
    """Return the full normalised kernel (float64), e.g. to inspect or plot it.

    ``"mean"`` is a uniform box. ``"gaussian"`` is the SVLS kernel of Islam & Glocker (IPMI 2021) used by the
    NACL paper: Gaussian weights over the window, the centre weight replaced by the sum of the neighbour
    weights, then renormalised, so the centre weighs 0.5 (unless the window is a single voxel).
    """
    _check_options(kernel, "replicate")
    sizes = ensure_kernel_size(kernel_size, spatial_dims)
    if kernel == "mean":
        k = torch.ones(sizes, dtype=torch.float64)
        return k / k.sum()
    w = _axis_weights(kernel, sizes, ensure_sigma(sigma, spatial_dims))
    k = w[0]
    for wa in w[1:]:
        k = k[..., None] * wa
    k = k.reshape(sizes).clone()
    centre = tuple(s // 2 for s in sizes)
    if k.numel() > 1:
        k[centre] = 1.0 - k[centre]
    return k / k.sum()


def _pad_codes(codes: torch.Tensor, radii: tuple[int, ...], padding: str) -> torch.Tensor:
    """Extend the label codes ``B,1,*spatial`` by ``radii`` voxels on both sides of every spatial axis."""
    if not any(radii):
        return codes
    if padding == "replicate":
        for axis, r in enumerate(radii):
            if r:
                n = codes.shape[2 + axis]
                idx = torch.arange(-r, n + r, device=codes.device).clamp_(0, n - 1)
                codes = codes.index_select(2 + axis, idx)
        return codes
    pad: list[int] = []
    for r in reversed(radii):
        pad += [r, r]
    return F.pad(codes, pad, value=0 if padding == "background" else _EMPTY)


def _filter_valid(x: torch.Tensor, radii: tuple[int, ...], weights: list[torch.Tensor] | None) -> torch.Tensor:
    """Separable 'valid' correlation over the spatial axes of ``x`` (``B,C,*spatial``)."""
    for axis, r in enumerate(radii):
        if r == 0:
            continue
        dim = 2 + axis
        n = x.shape[dim] - 2 * r
        if weights is None:
            out = torch.add(x.narrow(dim, 0, n), x.narrow(dim, 1, n))
            for j in range(2, 2 * r + 1):
                out.add_(x.narrow(dim, j, n))
        else:
            w = weights[axis].tolist()
            out = torch.mul(x.narrow(dim, 0, n), w[0])
            for j in range(1, 2 * r + 1):
                out.add_(x.narrow(dim, j, n), alpha=w[j])
        x = out
    return x


def _count_dtype(total: int) -> torch.dtype:
    if total <= 255:
        return torch.uint8
    return torch.int16 if total <= 32767 else torch.int32


def neighbor_prior(
    labels: torch.Tensor,
    num_classes: int,
    kernel: str = "mean",
    kernel_size: int | Sequence[int] = 3,
    sigma: float | Sequence[float] = 1.0,
    padding: str = "replicate",
    ignore_index: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Compute the neighbour prior τ of a batch of label maps.

    Args:
        labels: integer-valued labels ``B,1,*spatial`` (any numeric dtype, values in ``[0, num_classes)`` or
            ``ignore_index``). Values are not range-checked here; public entry points check them.
        num_classes: number of classes ``C``.
        kernel: ``"mean"`` (uniform box including the centre) or ``"gaussian"`` (the SVLS kernel, see
            :func:`dense_kernel`).
        kernel_size: odd window size, one for all axes or one per axis.
        sigma: Gaussian sigma in voxels (one or per axis); used by ``kernel="gaussian"``.
        padding: how the window is extended past the border. ``"replicate"``: nearest voxel, τ sums to 1
            everywhere. ``"zeros"``: outside voxels belong to no class (MONAI's ``NACLLoss``), τ sums to less
            than 1 at borders. ``"background"``: outside voxels are class 0 (the authors' 2D code).
        ignore_index: label value whose voxels are not neighbours; τ is renormalised over the valid
            neighbours (a voxel with no valid neighbour gets τ = 0).
        dtype: floating dtype of the result.

    Returns:
        τ of shape ``B,C,*spatial`` on the device of ``labels``.

    Example:
        >>> lab = torch.zeros(1, 1, 4, 4, 4); lab[..., 2:] = 1
        >>> neighbor_prior(lab, num_classes=2).sum(1).allclose(torch.ones(1, 4, 4, 4))
        True
    """
    _check_options(kernel, padding)
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must have shape B,1,*spatial, got {tuple(labels.shape)}.")
    spatial_dims = labels.ndim - 2
    sizes = ensure_kernel_size(kernel_size, spatial_dims)
    radii = tuple(k // 2 for k in sizes)
    weights = _axis_weights(kernel, sizes, ensure_sigma(sigma, spatial_dims))

    codes = labels.to(torch.int16) if labels.dtype != torch.int16 else labels
    if ignore_index is not None:
        codes = torch.where(labels == ignore_index, torch.full_like(codes, _IGNORED), codes)
    padded = _pad_codes(codes, radii, padding)
    classes = torch.arange(num_classes, device=labels.device, dtype=torch.int16).view(1, -1, *([1] * spatial_dims))
    onehot = padded == classes  # B,C,*padded, bool
    ignored = (padded == _IGNORED) if ignore_index is not None else None

    if weights is None:
        total = math.prod(sizes)
        # Box sums of a one-hot are integer counts: summing in a narrow integer type moves a quarter of the
        # bytes that float32 would, and the filter is memory-bound.
        cdt = _count_dtype(total)
        counts = _filter_valid(onehot.to(cdt), radii, None)
        if ignored is None:
            return torch.mul(counts, 1.0 / total).to(dtype)
        norm = total - _filter_valid(ignored.to(cdt), radii, None).to(torch.float32)
        return (counts / norm.clamp_min_(1.0)).to(dtype)

    # SVLS kernel = (G + (1 - 2 g_c) δ) / (2 (1 - g_c)), G the separable normalised Gaussian, g_c its centre.
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    gc = math.prod(float(w[r]) for w, r in zip(weights, radii))
    if gc >= 1.0:  # single-voxel window: the prior is the one-hot itself (all zero at ignored voxels)
        return onehot.to(dtype)
    centre = tuple(slice(r, s - r) for r, s in zip(radii, padded.shape[2:]))

    def svls(ind: torch.Tensor) -> torch.Tensor:
        ind = ind.to(wdt)
        out = _filter_valid(ind, radii, weights)
        return out.add_(ind[(slice(None), slice(None), *centre)], alpha=1.0 - 2.0 * gc)

    z = 2.0 * (1.0 - gc)
    tau = svls(onehot)
    if ignored is None:
        return tau.mul_(1.0 / z).to(dtype)
    norm = (z - svls(ignored)).clamp_min_(1e-12)
    return tau.div_(norm).to(dtype)
