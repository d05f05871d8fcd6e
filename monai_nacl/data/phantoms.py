"""Synthetic 3D phantoms with truly ambiguous boundaries, made in-process from a seed.

Three touching ellipsoids (classes 1-3) are rendered at a finer grid and averaged down, so boundary voxels
hold fractions of two or three classes (partial volume). The image mixes class intensities by those
fractions, is blurred and gets Gaussian noise; the label is the majority class of each voxel. A
well-calibrated model should therefore be unsure exactly at boundaries — which is what NACL targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering

__all__ = ["PHANTOM_CLASSES", "make_phantom"]

PHANTOM_CLASSES = ("background", "core", "shell", "cap")
_INTENSITY = torch.tensor([0.0, 1.0, 0.55, 0.8])


def make_phantom(
    seed: int, shape: Sequence[int] = (40, 40, 40), noise: float = 0.12, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, label)``, each ``1,*shape``: float32 intensities and uint8 labels in ``{0,1,2,3}``.

    Args:
        seed: random seed; the same seed always gives the same phantom.
        shape: volume shape (each >= 16).
        noise: standard deviation of the additive Gaussian noise (structure contrast is ~0.25-1).
        supersample: sub-voxels per axis used for the partial-volume rendering.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16, got {shape}.")
    g = torch.Generator().manual_seed(int(seed))

    def u(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    fine = [s * supersample for s in shape]
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in fine]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    pts = torch.stack([zz, yy, xx], -1)

    centre = 0.5 + u(-0.08, 0.08, 3)
    radii = u(0.16, 0.24, 3)
    # the shell surrounds the core on one side, the cap sits on top of both: three touching structures
    shell_c = centre + u(-0.05, 0.05, 3)
    shell_r = radii * u(1.35, 1.6)
    direction = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    cap_c = centre + direction * radii.mean() * 1.3
    cap_r = radii * u(0.6, 0.8)

    def inside(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (((pts - c) / r) ** 2).sum(-1) <= 1.0

    fine_label = torch.zeros(fine, dtype=torch.long)
    fine_label[inside(shell_c, shell_r)] = 2
    fine_label[inside(centre, radii)] = 1
    fine_label[inside(cap_c, cap_r)] = 3
    onehot = F.one_hot(fine_label, 4).permute(3, 0, 1, 2).double()[None]
    frac = F.avg_pool3d(onehot, supersample)[0]  # 4,*shape partial-volume fractions

    label = frac.argmax(0, keepdim=True).to(torch.uint8)
    image = (frac * _INTENSITY.double().view(4, 1, 1, 1)).sum(0, keepdim=True)
    image = _blur(image, sigma=0.8)
    image = image + noise * torch.randn(image.shape, generator=g, dtype=torch.float64)
    return image.float().numpy(), label.numpy()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``C,*spatial`` volume: sampled kernel of radius ``ceil(2 sigma)`` normalised to sum 1, in
    ``x``'s dtype, borders replicated. (``monai.networks.layers.GaussianFilter`` zero-pads and does not normalise
    its truncated kernel, which would change every phantom.)"""
    r = int(np.ceil(2 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    return separable_filtering(x[None], [k] * (x.ndim - 1), mode="replicate")[0]
